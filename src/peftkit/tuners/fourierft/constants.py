"""Default FourierFT targets per `config.model_type` (peft's table: LoRA's, but GPT-2 style models get `mlp.c_proj`)."""

from __future__ import annotations

from typing import Any

from .._lycoris import LYCORIS_TARGET_MODULES_BY_MODEL_TYPE

# peft copies its LoRA table; LYCORIS_... is ours completed to that table (less our DistilBERT entry,
# which peft's FourierFT table lacks).
FOURIERFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    **{name: targets for name, targets in LYCORIS_TARGET_MODULES_BY_MODEL_TYPE.items() if name != "distilbert"},
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
}
