"""`MissModel`: the MiSS tuner -- wraps targeted Linear (and quantized linear) modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import MissConfig
from .layer import SUPPORTED_LAYERS, MissLayer, dispatch_linear

#: peft's MiSS defaults: the same copy of its LoRA table as HiRA's.
MISS_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(HIRA_TARGET_MODULES_BY_MODEL_TYPE)


class MissModel(BiasOptions, BaseTuner):
    """Creates MiSS adapters on a model: `MissModel(model, MissConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "miss_"
    default_target_modules = MISS_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = MissLayer
    dispatchers = (dispatch_linear,)
    display_name = "MiSS"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: MissConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"r": config.r, "mini_r": config.mini_r, "miss_dropout": config.miss_dropout,
                "init_weights": config.init_weights}
