"""`SupertuningModel`: the Super-Tuning tuner -- wraps targeted `nn.Linear` modules.

Checkpoints (as peft writes them):

    <module>.supertuning_values (k,)            <module>.supertuning_indices (k,) int32 (save_precomputed_indices)
    <module>.supertuning_lora_A.weight (r, in)  <module>.supertuning_lora_B.weight (out, r)     (when r is set)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import ConfigError, TargetModulesError
from .._core.base_layers import base_of
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import SupertuningConfig
from .layer import SUPPORTED_LAYERS, SupertuningLayer, dispatch_linear

#: peft's table: LoRA's defaults.
SUPERTUNING_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)


class UnsupportedLayerError(TargetModulesError, TypeError):
    """A target that is not an `nn.Linear` (a TypeError, as peft raises it)."""


def refuse_unsupported(target: nn.Module, adapter_name: str, **_: Any) -> None:
    raise UnsupportedLayerError(
        f"Target module {base_of(target)} is not supported. Currently, only `torch.nn.Linear` is supported."
    )


class SupertuningModel(BaseTuner):
    """Creates Super-Tuning adapters on a model: `SupertuningModel(model, SupertuningConfig(...), "default")`."""

    prefix = "supertuning_"
    layer_cls = SupertuningLayer
    dispatchers = (dispatch_linear, refuse_unsupported)
    default_target_modules = SUPERTUNING_TARGET_MODULES_BY_MODEL_TYPE
    display_name = "Super-Tuning"
    supported_layers = SUPPORTED_LAYERS

    def _check_new_adapter_config(self, config: SupertuningConfig) -> None:
        """Every adapter saves its indices, or none does (peft's error)."""
        super()._check_new_adapter_config(config)
        values = sorted({other.save_precomputed_indices for other in [*self.peft_config.values(), config]})
        if len(values) > 1:
            raise ConfigError(
                "Super-Tuning indices must be saved for all adapters or none, but got multiple different values: "
                f"{values}"
            )

    def layer_kwargs(self, config: SupertuningConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "sparsity": config.sparsity,
            "select_top": config.select_top,
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "init_weights": config.init_weights,
        }

    def new_layer_kwargs(self, config: SupertuningConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"save_precomputed_indices": config.save_precomputed_indices}
