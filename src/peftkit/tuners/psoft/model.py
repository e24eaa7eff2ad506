"""`PsoftModel`: the PSOFT tuner -- wraps targeted dense `nn.Linear` modules."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import PsoftConfig
from .layer import SUPPORTED_LAYERS, PsoftLayer, dispatch_linear

#: peft's PSOFT defaults are LoRA's: the query/value projections per architecture.
PSOFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)

FAN_IN_FAN_OUT_WARNING = "fan_in_fan_out=True is not compatible with `torch.nn.Linear`. Setting fan_in_fan_out=False."


class PsoftModel(BaseTuner):
    """Creates PSOFT adapters on a model: `PsoftModel(model, PsoftConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "psoft_"
    default_target_modules = PSOFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = PsoftLayer
    dispatchers = (dispatch_linear,)
    display_name = "PSOFT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: PsoftConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "psoft_alpha": config.psoft_alpha,
            "psoft_dropout": config.psoft_dropout,
            "ab_svd_init": config.ab_svd_init,
            "psoft_svd": config.psoft_svd,
            "psoft_svd_lowrank_niter": config.psoft_svd_lowrank_niter,
            "random_seed": config.random_seed,
            "init_weights": config.init_weights,
            "orth": config.psoft_orth,
            "mag_b": config.psoft_mag_b,
            "mag_a": config.psoft_mag_a,
            "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
            "cayley_neumann_eps": config.cayley_neumann_eps,
        }

    def new_layer_kwargs(self, config: PsoftConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # As peft: a Linear target corrects fan_in_fan_out=True (in the adapter's own copy of the config).
        if config.fan_in_fan_out:
            warnings.warn(FAN_IN_FAN_OUT_WARNING, stacklevel=5)
            config.fan_in_fan_out = False
        return {}
