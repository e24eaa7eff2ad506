"""`GraloraModel`: the GraLoRA tuner -- wraps targeted Linear, GPT-2 Conv1D (and quantized linear) modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.base_layers import correct_fan_in_fan_out
from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from ..vblora.shared import refuse_unsupported
from .config import GraloraConfig
from .layer import SUPPORTED_LAYERS, GraloraLayer, dispatch_linear

#: peft's GraLoRA defaults: a copy of its LoRA table (the query/value projections per architecture).
GRALORA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)


class GraloraModel(BiasOptions, BaseTuner):
    """Creates GraLoRA adapters on a model: `GraloraModel(model, GraloraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "gralora_"
    default_target_modules = GRALORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = GraloraLayer
    dispatchers = (dispatch_linear, refuse_unsupported("GraLoRA", SUPPORTED_LAYERS))
    display_name = "GraLoRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: GraloraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "alpha": config.alpha,
            "gralora_k": config.gralora_k,
            "hybrid_r": config.hybrid_r,
            "gralora_dropout": config.gralora_dropout,
            "init_weights": config.init_weights,
        }

    def new_layer_kwargs(self, config: GraloraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        correct_fan_in_fan_out(config, target)  # as peft: the base decides the layout
        return {}
