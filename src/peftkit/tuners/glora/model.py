"""`GloraModel`: the GLoRA tuner -- wraps targeted plain `nn.Linear` modules; mixed-adapter batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ...errors import AdapterStateError, ConfigError
from .._core.bias import BiasOptions
from .._core.call_state import call_scope
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from ..lora.mixed_batch import check_names
from .config import GloraConfig
from .layer import SUPPORTED_LAYERS, GloraLayer, dispatch_linear

#: peft's GLoRA defaults are LoRA's: the query/value projections per architecture.
GLORA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)


class GloraModel(BiasOptions, BaseTuner):
    """Creates GLoRA adapters on a model: `GloraModel(model, GloraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "glora_"
    default_target_modules = GLORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = GloraLayer
    dispatchers = (dispatch_linear,)
    display_name = "GLoRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: GloraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "config_A_B": config.config_A_B,
            "config_C": config.config_C,
            "config_D_E": config.config_D_E,
            "init_weights": config.init_weights,
        }

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """For one forward / generate call (inference only), row i of the batch uses adapter `adapter_names[i]`.

        "__base__" means no adapter; rows whose adapter does not wrap a layer pass it unchanged.
        """
        if self.training:
            raise ConfigError("Cannot pass `adapter_names` when the model is in training mode. Call model.eval() first.")
        check_names(adapter_names, list(self.peft_config))
        if any(layer.merged for _, layer in self.tuner_layers()):
            raise AdapterStateError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        with call_scope(adapter_names=tuple(adapter_names)):
            yield
