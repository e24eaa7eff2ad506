"""`IA3Model`: the (IA)^3 tuner -- resolves targets and feed-forward modules, wraps the targets."""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError, TargetModulesError
from ...registry import register_method
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set
from .._core.layer import BaseTunerLayer
from .._core.module_tree import replace_module
from .._core.tuner import BaseTuner
from .config import IA3Config
from .constants import IA3_FEEDFORWARD_MODULES_BY_MODEL_TYPE, IA3_TARGET_MODULES_BY_MODEL_TYPE
from .layer import IA3_DISPATCHERS, Conv, IA3Layer, Linear

SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D, torch.nn.Conv2d and torch.nn.Conv3d"


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

    def _create_and_replace(
        self,
        config: IA3Config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, IA3Layer):
            target.update_layer(adapter_name, init_ia3_weights=config.init_ia3_weights)
            return
        kwargs: dict[str, Any] = {
            "is_feedforward": is_feedforward(config, current_key),
            "init_ia3_weights": config.init_ia3_weights,
        }
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        candidates = (dispatch(target, adapter_name, **kwargs) for dispatch in reversed(IA3_DISPATCHERS))
        dispatched = next((module for module in candidates if module is not None), None)
        if dispatched is not None:
            replace_module(parent, target_name, dispatched)
            return
        if isinstance(base, (nn.Conv2d, nn.Conv3d)):
            new_module: IA3Layer = Conv(target, adapter_name, **kwargs)
        elif isinstance(base, (nn.Linear, Conv1D)):
            stored_transposed = isinstance(base, Conv1D)
            if config.fan_in_fan_out != stored_transposed:
                warnings.warn(
                    f"fan_in_fan_out={config.fan_in_fan_out} is wrong for {type(base).__name__} {current_key!r}; "
                    f"using {stored_transposed}.",
                    stacklevel=4,
                )
                # As peft: the adapter's (private copy of the) config records the layout it found.
                config.fan_in_fan_out = stored_transposed
            new_module = Linear(target, adapter_name, **kwargs)
        else:
            raise TargetModulesError(
                f"Target module {current_key!r} is a {type(base).__name__}, which IA3 cannot wrap. Supported: "
                f"{SUPPORTED_LAYERS}. Narrow target_modules (or add {target_name!r} to exclude_modules)."
            )
        replace_module(parent, target_name, new_module)


register_method(PeftType.IA3, IA3Config, IA3Model, prefix="ia3_")
