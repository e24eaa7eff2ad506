"""`LilyModel`: the Lily tuner -- wraps targeted Linear modules, then shares A and B across each target's layers."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import LilyConfig
from .layer import NOT_MERGEABLE, SUPPORTED_LAYERS, LilyLayer, LilyMergeError, dispatch_linear

#: peft's Lily defaults: a copy of its LoRA table (the query/value projections per architecture), as HiRA's.
LILY_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(HIRA_TARGET_MODULES_BY_MODEL_TYPE)
#: peft's name for the same table (the same object).
TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING = LILY_TARGET_MODULES_BY_MODEL_TYPE


def sharing_groups(model: nn.Module, config: LilyConfig, adapter_name: str) -> dict[tuple, list[LilyLayer]]:
    """The layers holding `adapter_name`, in model order, grouped by (target name they match, weight shape).

    A regex target is one name; with a list, a module takes the longest name its path ends with.
    """
    targets = config.target_modules
    groups: dict[tuple, list[LilyLayer]] = {}
    for key, module in model.named_modules():
        if not isinstance(module, LilyLayer) or adapter_name not in module.lily_A:
            continue
        if isinstance(targets, str):
            suffix: Optional[str] = targets
        else:
            suffix = max((name for name in targets if key.endswith(name)), key=len, default=None)
        if suffix is None:  # wrapped through a state dict's module names: a group of its own
            suffix = key
        groups.setdefault((suffix, module.out_features, module.in_features), []).append(module)
    return groups


class LilyModel(BaseTuner):
    """Creates Lily adapters on a model: `LilyModel(model, LilyConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "lily_"
    default_target_modules = LILY_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = LilyLayer
    dispatchers = (dispatch_linear,)
    display_name = "Lily"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: LilyConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "scaling": config.scaling,
            "stride_A": config.stride_A,
            "num_B": config.num_B,
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }

    def _inject(self, adapter_name: str, config: LilyConfig, targets: Optional[set[str]] = None) -> None:
        """Wrap every target with its own tensors, then share: per group, B from the first layer and
        A from the first layer of each run of `stride_A` layers."""
        super()._inject(adapter_name, config, targets)
        for layers in sharing_groups(self.model, config, adapter_name).values():
            shared_B = layers[0].lily_B[adapter_name]
            for index, layer in enumerate(layers):
                leader = layers[index - index % config.stride_A]
                if layer is not layers[0]:
                    layer.lily_B[adapter_name] = shared_B
                if layer is not leader:
                    layer.lily_A[adapter_name] = leader.lily_A[adapter_name]

    # ------------------------------------------------------------------ no merging (as peft)
    def _check_merge_allowed(self) -> None:
        raise LilyMergeError(NOT_MERGEABLE)

    def unmerge_adapter(self) -> None:
        raise LilyMergeError(NOT_MERGEABLE)
