"""`C3AModel`: the C3A tuner -- wraps targeted Linear (and GPT-2 Conv1D) modules."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import C3AConfig
from .layer import SUPPORTED_LAYERS, C3ALayer, dispatch_linear

#: peft's C3A defaults: LoRA's, except GPT-2-style models, whose default is the MLP output.
C3A_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    **LORA_TARGET_MODULES_BY_MODEL_TYPE,
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
}


def block_size_at(config: C3AConfig, key: str) -> int:
    """peft's lookup: the first `block_size_pattern` key matching `.*\\.<key>$`, else the exact module path."""
    patterns = config.block_size_pattern or {}
    found = next((pattern for pattern in patterns if re.match(rf".*\.{pattern}$", key)), key)
    return patterns.get(found, config.block_size)


class C3AModel(BiasOptions, BaseTuner):
    """Creates C3A adapters on a model: `C3AModel(model, C3AConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "c3a_"
    default_target_modules = C3A_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = C3ALayer
    dispatchers = (dispatch_linear,)
    display_name = "C3A"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: C3AConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"block_size": block_size_at(config, key), "init_weights": config.init_weights}
