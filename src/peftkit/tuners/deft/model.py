"""`DeftModel`: the DEFT tuner -- wraps targeted Linear and GPT-2 Conv1D modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.base_layers import correct_fan_in_fan_out
from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import DeftConfig
from .layer import SUPPORTED_LAYERS, DeftLayer, dispatch_linear

#: peft's DEFT defaults: a copy of its LoRA table (the query/value projections per architecture).
DEFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)


class DeftModel(BiasOptions, BaseTuner):
    """Creates DEFT adapters on a model: `DeftModel(model, DeftConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "deft_"
    default_target_modules = DEFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = DeftLayer
    dispatchers = (dispatch_linear,)
    display_name = "DEFT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: DeftConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "decomposition_method": config.decomposition_method,
            "init_scale": config.init_scale,
            "alpha": config.alpha,
            "para": config.para,
            "deft_dropout": config.deft_dropout,
            "init_weights": config.init_weights,
        }

    def new_layer_kwargs(self, config: DeftConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        correct_fan_in_fan_out(config, target)  # as peft: the base decides the layout
        return {}
