"""`GraloraModel`: the GraLoRA tuner -- wraps targeted Linear, GPT-2 Conv1D (and quantized linear) modules."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.base_layers import base_of
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
        # The layout follows the base; as peft, a disagreeing flag is warned about and corrected in the
        # adapter's (private) config.
        base = base_of(target)
        if isinstance(base, nn.Linear) and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=5,
            )
            config.fan_in_fan_out = False
        elif isinstance(base, Conv1D) and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=5,
            )
            config.fan_in_fan_out = True
        return {}
