"""`IA3Model`: the (IA)^3 tuner -- resolves targets and feed-forward modules, wraps the targets."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from ...errors import ConfigError
from ...utils.validation import as_name_set
from .._core.tuner import BaseTuner
from .config import IA3Config
from .constants import IA3_FEEDFORWARD_MODULES_BY_MODEL_TYPE, IA3_TARGET_MODULES_BY_MODEL_TYPE
from .layer import SUPPORTED_LAYERS, IA3Layer, dispatch_conv, dispatch_linear


def is_feedforward(config: IA3Config, key: str) -> bool:
    """peft's rule: a regex must match the whole path; a name matches when the path ends with it.

    (A plain suffix test, not a dotted one: "output.dense" also selects "attention.output.dense".)
    """
    names = config.feedforward_modules
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key.endswith(name) for name in names or ())


class IA3Model(BaseTuner):
    """Creates (IA)^3 adapters on a model: `IA3Model(model, IA3Config(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "ia3_"
    default_target_modules = IA3_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = IA3Layer
    dispatchers = (dispatch_linear, dispatch_conv)
    display_name = "IA3"
    supported_layers = SUPPORTED_LAYERS

    def _prepare_adapter_config(self, config: IA3Config) -> IA3Config:
        """Resolve `target_modules` (core rules) and `feedforward_modules` (per-architecture default).

        As in peft, the subset check runs when the user builds the config, not on the resolved
        names (e.g. "all-linear" expands to full paths, which short feed-forward names are not).
        """
        resolved = super()._prepare_adapter_config(dataclasses.replace(config, feedforward_modules=None))
        feedforward = config.feedforward_modules
        if feedforward is None:
            model_type = self._model_type()
            if model_type not in IA3_FEEDFORWARD_MODULES_BY_MODEL_TYPE:
                raise ConfigError(
                    f"feedforward_modules is not set and peftkit has no default for model type {model_type!r}; "
                    "pass feedforward_modules=[...] (a subset of target_modules, possibly empty)."
                )
            feedforward = IA3_FEEDFORWARD_MODULES_BY_MODEL_TYPE[model_type]
        resolved.feedforward_modules = as_name_set(feedforward)
        return resolved

    def layer_kwargs(self, config: IA3Config, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"init_ia3_weights": config.init_ia3_weights}

    def new_layer_kwargs(self, config: IA3Config, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # Fixed when the layer is made: a layer scales either its input or its output.
        return {"is_feedforward": is_feedforward(config, key)}

