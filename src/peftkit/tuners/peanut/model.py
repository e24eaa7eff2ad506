"""`PeanutModel`: the PEANuT tuner -- wraps targeted `nn.Linear` modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import PeanutConfig
from .layer import SUPPORTED_LAYERS, PeanutLayer, dispatch_linear

#: peft's PEANuT defaults: its copy of the LoRA table (the query/value projections per architecture).
PEANUT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(HIRA_TARGET_MODULES_BY_MODEL_TYPE)


class PeanutModel(BaseTuner):
    """Creates PEANuT adapters on a model: `PeanutModel(model, PeanutConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "peanut_"
    default_target_modules = PEANUT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = PeanutLayer
    dispatchers = (dispatch_linear,)
    display_name = "PEANuT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: PeanutConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"r": config.r, "depth": config.depth, "act_fn": config.act_fn, "scaling": config.scaling,
                "init_weights": config.init_weights}
