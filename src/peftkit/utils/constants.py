"""File names, format version and per-architecture default target modules."""

from __future__ import annotations

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# The peft checkpoint-format release our files match (see ../shared/FORMATS.md). The part after
# "@" names the writer, the way peft marks its own development builds.
PEFT_FORMAT_VERSION = "0.21.2@peftkit"

# Prefix of every in-file key of an adapter saved from a PeftModel:
# PeftModel.base_model (the tuner) -> .model (the wrapped transformers model).
PEFT_MODEL_PREFIX = "base_model.model."

# Heads that SEQ_CLS / TOKEN_CLS / QUESTION_ANS wrappers train in full (peft does the same).
CLASSIFIER_MODULE_NAMES = ("classifier", "score")
QA_MODULE_NAMES = ("qa_outputs",)

# Layer-index names tried for `layers_to_transform` when `layers_pattern` is not given.
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")

# Query/value projections (or the fused QKV projection) per `config.model_type`.
LORA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
