"""Default WaveFT targets per `config.model_type` (peft's table; used when `target_modules` is not set)."""

from __future__ import annotations

from typing import Any

from ..fourierft.constants import FOURIERFT_TARGET_MODULES_BY_MODEL_TYPE

# peft's WaveFT table is its FourierFT table less three architectures.
WAVEFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    name: targets
    for name, targets in FOURIERFT_TARGET_MODULES_BY_MODEL_TYPE.items()
    if name not in ("btlm", "rwkv", "rwkv7")
}
