"""`HRAModel`: the HRA tuner -- wraps targeted Linear / Conv2d (and quantized linear) modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from .._lycoris import LYCORIS_TARGET_MODULES_BY_MODEL_TYPE
from .config import HRAConfig
from .layer import SUPPORTED_LAYERS, HRALayer, dispatch_conv2d, dispatch_linear

#: peft's HRA defaults are a copy of its LoRA table: the query/value projections per architecture
#: (peft's table has no "distilbert" entry).
HRA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    model_type: targets for model_type, targets in LYCORIS_TARGET_MODULES_BY_MODEL_TYPE.items() if model_type != "distilbert"
}


class HRAModel(BiasOptions, BaseTuner):
    """Creates HRA adapters on a model: `HRAModel(model, HRAConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "hra_"
    default_target_modules = HRA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = HRALayer
    dispatchers = (dispatch_conv2d, dispatch_linear)
    display_name = "HRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: HRAConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """Per-adapter settings every HRA layer receives."""
        return {"r": config.r, "apply_GS": config.apply_GS, "init_weights": config.init_weights}
