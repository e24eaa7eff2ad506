"""Facts about the layers adapters wrap, shared by the methods that wrap Linear-like and conv layers."""

from __future__ import annotations

import warnings

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import TargetModulesError


def linear_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a GPT-2 `Conv1D` (whose weight is (in, out))."""
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    return base_layer.in_features, base_layer.out_features


def stored_transposed(base_layer: nn.Module, fan_in_fan_out: bool) -> bool:
    """The right `fan_in_fan_out` for `base_layer` (True only for Conv1D), warning when the config says otherwise."""
    is_conv1d = isinstance(base_layer, Conv1D)
    if fan_in_fan_out and not is_conv1d:
        warnings.warn("fan_in_fan_out=True is wrong for torch.nn.Linear; using False.", stacklevel=5)
    elif is_conv1d and not fan_in_fan_out:
        warnings.warn("transformers' Conv1D stores its weight (in, out); using fan_in_fan_out=True.", stacklevel=5)
    return is_conv1d


def refuse_grouped_conv(base_layer: nn.Module, method: str) -> None:
    """Low-rank conv updates assume groups == 1; say so clearly otherwise."""
    if getattr(base_layer, "groups", 1) != 1:
        raise TargetModulesError(
            f"{method} does not support grouped convolutions (groups={base_layer.groups}); "
            "exclude this module via exclude_modules."
        )


def unobserved(*modules: nn.Module) -> bool:
    """No forward hook (own or global) and no patched `forward` on any of `modules`.

    Fused paths call the modules' maths directly instead of the modules, so they are only taken
    when nothing would notice the modules being skipped.
    """
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def is_plain_linear(module: nn.Module) -> bool:
    """A stock `nn.Linear` or transformers `Conv1D` (not a subclass: those may change the maths)."""
    return type(module) in (nn.Linear, Conv1D)
