r"""(IA)^3 layers: a frozen base layer whose output (or input) is rescaled by a learned vector.

    attention-type target:     y = l * (W x + b)        l: (out, 1)   saved as `...ia3_l`
    feed-forward target:       y = W (l * x) + b        l: (1, in)

A new vector starts at ones (`init_ia3_weights=True`), so a fresh adapter is a no-op. Several
active adapters multiply their vectors. The update is multiplicative, so merging scales the base
weight instead of adding to it:

    attention:      W <- diag(l) W,  b <- l * b
    feed-forward:   W <- W diag(l)                      (the bias is untouched)

Unmerging divides again; entries of l that are exactly zero cannot be undone (warned about).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.base_layers import is_linear_like, is_plain_linear, unobserved, wraps
from .._core.layer import BaseTunerLayer
from .fused import IA3LinearFunction, can_fold


class IA3Layer(BaseTunerLayer, nn.Module):
    """What every (IA)^3 layer shares: one vector per adapter in `ia3_l`, multiplicative merging."""

    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool = False, init_ia3_weights: bool = True
    ) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self._init_geometry(self.get_base_layer())
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, init_ia3_weights)

    def _init_geometry(self, base: nn.Module) -> None:
        """Set `in_features` / `out_features` (and layout details) from the wrapped base layer."""
        raise NotImplementedError

    def _vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        """`ia3_l[adapter_name]` shaped to broadcast against the base weight."""
        raise NotImplementedError

    def _activation_factor(self, vector: torch.Tensor) -> torch.Tensor:
        """A vector shaped to broadcast against the layer's input (feed-forward) or output."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add (or replace) adapter `adapter_name`: ones, or N(0, 1) entries when not initialised."""
        shape = self._vector_shape()
        self.ia3_l[adapter_name] = nn.Parameter(torch.ones(shape) if init_ia3_weights else torch.randn(shape))
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.ia3_l]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Scale the input (feed-forward) or the output by the product of the active vectors."""
        if self._disable_adapters and self.merged:
            self.unmerge()
        active = [] if self._disable_adapters or self.merged else self._active_here()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        scaling = self.ia3_l[active[0]]
        for name in active[1:]:
            scaling = scaling * self.ia3_l[name]
        scaling = self._activation_factor(scaling)
        if self.is_feedforward:
            return self.base_layer((x.to(scaling.dtype) * scaling).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(scaling.dtype) * scaling).to(result.dtype)

    # ------------------------------------------------------------------ merging (multiplicative)
    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W * l (b <- b * l for attention targets; the bias is untouched for feed-forward ones)."""
        weight = (weight * self._weight_factor(adapter_name).detach()).to(weight.dtype)
        if self.is_feedforward or bias is None:
            return weight, bias
        return weight, (bias * self.ia3_l[adapter_name].detach().reshape(bias.shape)).to(bias.dtype)

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W / l (and b <- b / l); entries of l that are exactly zero cannot be undone (warned about)."""
        factor = self._weight_factor(adapter_name).detach()
        if (factor == 0).any():
            warnings.warn(
                f"Adapter {adapter_name!r} has zero entries; the weights they zeroed cannot be restored by unmerging.",
                stacklevel=4,
            )
        weight = (weight / _nonzero(factor)).to(weight.dtype)
        if self.is_feedforward or bias is None:
            return weight, bias
        return weight, (bias / _nonzero(self.ia3_l[adapter_name].detach().reshape(bias.shape))).to(bias.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


def _nonzero(factor: torch.Tensor) -> torch.Tensor:
    """`factor` with exact zeros replaced by ones, so dividing by it never yields NaN/inf."""
    return torch.where(factor == 0, torch.ones_like(factor), factor)


class Linear(IA3Layer):
    """(IA)^3 on `nn.Linear` or transformers' `Conv1D` (`fan_in_fan_out=True`, weight stored (in, out))."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.fan_in_fan_out = isinstance(base, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def _vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]
        return vector.T if self.fan_in_fan_out else vector

    def _activation_factor(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.flatten()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """As `IA3Layer.forward`; one adapter on a plain CPU base runs as `IA3LinearFunction`."""
        vector = None if args or kwargs else self._foldable_vector(x)
        if vector is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        return IA3LinearFunction.apply(x, weight, base.bias, vector, self.is_feedforward)

    def _foldable_vector(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The one active vector when it can be folded into the weight (see `fused.py`), else None.

        That is: adapters on and unmerged, one active adapter, a stock unhooked `nn.Linear` /
        `Conv1D` base, CPU tensors of one dtype, no autocast and no `torch.compile` (whose graph
        would break on `can_fold`'s check), no entry of l near zero, and more tokens than the
        weight's other dimension: scaling the (out, in) weight must be cheaper than scaling the
        activation (it is not when decoding one token at a time).
        """
        if self._disable_adapters or self.merged or x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
        if tokens <= (self.out_features if self.is_feedforward else self.in_features):
            return None
        active = self._active_here()
        base = self.base_layer
        if len(active) != 1 or not is_plain_linear(base) or not unobserved(base):
            return None
        vector = self.ia3_l[active[0]]
        if torch.is_autocast_enabled("cpu") or len({x.dtype, vector.dtype, base.weight.dtype}) != 1:
            return None
        if base.bias is not None and base.bias.dtype != x.dtype:
            return None
        return vector if can_fold(vector) else None


class Conv(IA3Layer):
    """(IA)^3 on `nn.Conv2d` / `nn.Conv3d`: one factor per input (feed-forward) or output channel."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.kernel_dims = base.weight.dim() - 2

    def _vector_shape(self) -> tuple[int, ...]:
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * self.kernel_dims

    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]
        if not self.is_feedforward:
            return vector.transpose(0, 1)  # (out, 1, 1, ...): one factor per output filter
        groups = self.get_base_layer().groups
        if groups == 1:
            return vector
        # Weight is (out, in / groups, ...): filter o of group g sees input channels g*in_g ... (g+1)*in_g - 1.
        in_per_group, out_per_group = self.in_features // groups, self.out_features // groups
        per_group = vector.reshape(groups, 1, in_per_group, *vector.shape[2:])
        expanded = per_group.expand(groups, out_per_group, in_per_group, *vector.shape[2:])
        return expanded.reshape(self.out_features, in_per_group, *vector.shape[2:])

    def _activation_factor(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.reshape(-1, *(1,) * self.kernel_dims)  # (channels, 1, 1): batched or not


# ---------------------------------------------------------------------- dispatchers (IA3Model.dispatchers)
dispatch_linear = wraps(is_linear_like, Linear)  # Linear, Conv1D and quantized linear bases
dispatch_conv = wraps((nn.Conv2d, nn.Conv3d), Conv)
SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D, torch.nn.Conv2d/3d and quantized linear layers"
