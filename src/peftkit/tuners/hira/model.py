"""`HiraModel`: the HiRA tuner -- wraps targeted Linear / Conv1D / Embedding / Conv1d-3d / quantized linear modules."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.base_layers import base_of
from .._core.matching import pattern_value
from .._core.tuner import BaseTuner
from .._lycoris import LYCORIS_TARGET_MODULES_BY_MODEL_TYPE
from .config import HiraConfig
from .layer import SUPPORTED_LAYERS, HiraLayer, dispatch_default

#: peft's HiRA defaults: its copy of the LoRA table (the query/value projections per architecture).
HIRA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    model_type: targets for model_type, targets in LYCORIS_TARGET_MODULES_BY_MODEL_TYPE.items() if model_type != "distilbert"
}


class HiraModel(BaseTuner):
    """Creates HiRA adapters on a model: `HiraModel(model, HiraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "hira_"
    default_target_modules = HIRA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = HiraLayer
    dispatchers = (dispatch_default,)
    display_name = "HiRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: HiraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # As peft 0.21.2: `rank_pattern` sizes adapters added to an already wrapped module only; a module
        # the adapter wraps gets `r` (peft's checkpoints have those shapes, so both load either way).
        rank = pattern_value(config.rank_pattern, key, config.r) if isinstance(target, HiraLayer) else config.r
        return {"r": rank, "hira_dropout": config.hira_dropout, "init_weights": config.init_weights}

    def new_layer_kwargs(self, config: HiraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # The layout follows the base; peft warns when the flag disagrees (and leaves the config as it is).
        base = base_of(target)
        if isinstance(base, nn.Linear) and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=5,
            )
        elif isinstance(base, Conv1D) and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=5,
            )
        return {}
