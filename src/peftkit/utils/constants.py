"""File names, format version and the key and module names every method shares.

Per-architecture default targets live with their method (`tuners/<method>/constants.py`).
"""

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
