"""Default VB-LoRA targets per `config.model_type` (peft's table; used when `target_modules` is not set)."""

from __future__ import annotations

from typing import Any

VBLORA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def lora_table() -> dict[str, Any]:
    """peft's LoRA target table, which peft copies for UniLoRA and RandLoRA (peft has no "distilbert" entry)."""
    from .._lycoris import LYCORIS_TARGET_MODULES_BY_MODEL_TYPE

    return {name: value for name, value in LYCORIS_TARGET_MODULES_BY_MODEL_TYPE.items() if name != "distilbert"}
