r"""HRA layers: the base weight times an orthogonal matrix H made of Householder reflections.

    Linear (and quantized linear):  W' = W H      y = x H^T W^T + b = base(x H^T)      d = in_features
    Conv2d:                          W' = W H      W viewed (out, in_channels * kh * kw)   d = in * kh * kw

    H = (I - 2 v_1 v_1^T) ... (I - 2 v_r v_r^T),  v_i = hra_u[:, i] / ||hra_u[:, i]||      hra_u: d x r
    apply_GS: H = I - 2 Q Q^T, Q the Gram-Schmidt orthonormalisation of hra_u's columns

Init (`init_weights=True`, even r): the columns come in equal pairs (v_1 = v_2, ...), and a
reflection applied twice is the identity, so H = I and a new adapter is a no-op. An odd r cannot
be paired: every column is random (Kaiming-uniform) and H != I, with peft's warning. Saved as
`<module>.hra_u`, shape (d, r).

Where H is applied (it is never formed; `householder.py` keeps it as I - V T V^T):

- Linear: on the input, `x H^T` -- 2 d r multiply-adds per token, against out * d per token for
  the base matmul; rotating the weight instead would cost 2 out d r and, in training, a full
  tokens * out * d gradient of the rotated weight. It leaves the (possibly quantized) base untouched.
- Conv2d: on the kernel, `W H` (2 out d r), then the base convolution.
- Merging writes W H into the base; unmerging W' H^T (H is orthogonal: H^-1 = H^T, as peft
  undoes it with the reflections in reverse order).

Several active adapters on one layer compose in the order merging folds them (W H_1 H_2 ...), so
merged and unmerged outputs agree; for a Linear the last active adapter's H^T meets the input first.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, TargetModulesError
from ...quantization.weights import is_quantized
from .._core.base_layers import is_plain_linear, wraps
from .._core.layer import BaseTunerLayer
from .householder import compact_factors, compute_dtype, dense, reflect_rows

SUPPORTED_LAYERS = "torch.nn.Linear, torch.nn.Conv2d and quantized linear layers"
ODD_RANK_WARNING = "The symmetric initialization can NOT be performed when r is odd!"
SCALE_WARNING = "Scaling operation for HRA not supported! Automatically set scale to 1."
UNSCALE_WARNING = "Unscaling operation for HRA not supported! Keeping scale at 1."

Factors = tuple[torch.Tensor, torch.Tensor]


class HRALayer(BaseTunerLayer, nn.Module):
    """What every HRA layer shares: one `hra_u` (d x r) per adapter, multiplicative merging."""

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.hra_u = nn.ParameterDict({})
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}
        self.cast_input_dtype_enabled = True  # peft's flag; inputs are always computed in the adapter dtype
        self._init_geometry(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ geometry (per layer kind)
    def _init_geometry(self, base: nn.Module) -> None:
        """Set `in_features` / `out_features` from the wrapped base layer."""
        raise NotImplementedError

    @property
    def reflected_features(self) -> int:
        """d: the dimension H acts on."""
        return self.in_features

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, r: int, apply_GS: bool = False, init_weights: bool = True) -> None:
        """Add (or replace) adapter `adapter_name`: r reflections of the d-dimensional input space."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = apply_GS
        self.hra_u[adapter_name] = nn.Parameter(torch.empty(self.reflected_features, r))
        if init_weights:
            self.reset_hra_parameters(adapter_name)
        else:
            self.reset_hra_parameters_random(adapter_name)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_hra_parameters(self, adapter_name: str) -> None:
        """Symmetric init: Kaiming-uniform columns, each repeated once (H = I); odd r: all random, warned."""
        param = self.hra_u[adapter_name]
        if self.hra_r[adapter_name] % 2 != 0:
            warnings.warn(ODD_RANK_WARNING, stacklevel=2)
            self.reset_hra_parameters_random(adapter_name)
            return
        half = torch.empty(param.shape[0], param.shape[1] // 2, dtype=param.dtype, device=param.device)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        with torch.no_grad():
            param.copy_(torch.repeat_interleave(half, 2, dim=1))

    def reset_hra_parameters_random(self, adapter_name: str) -> None:
        """Every column Kaiming-uniform (a=sqrt(5)): a random H, not the identity."""
        nn.init.kaiming_uniform_(self.hra_u[adapter_name], a=math.sqrt(5))

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.hra_u]

    def _factors(self, adapter_name: str) -> Factors:
        """(V, T) with H = I - V T V^T, in float32 at least (see householder.py)."""
        return compact_factors(self.hra_u[adapter_name], self.hra_apply_GS[adapter_name])

    def get_delta_weight(self, adapter_name: str, reverse: bool = False) -> torch.Tensor:
        """H of `adapter_name` as a dense d x d matrix (H^T = H^-1 with `reverse`), peft's API.

        HRA merges by multiplication (`fold`); forward and merging never form this matrix.
        """
        v, t = self._factors(adapter_name)
        return dense(v, t, transpose=reverse).to(self.hra_u[adapter_name].dtype)

    # ------------------------------------------------------------------ merging (multiplicative)
    def _reflect_weight(self, adapter_name: str, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        """W H (or W H^T, which undoes it), the weight viewed (out, d)."""
        with torch.no_grad():
            v, t = self._factors(adapter_name)
        flat = weight.reshape(weight.shape[0], -1).to(v.dtype)
        return reflect_rows(flat, v, t, transpose=inverse).reshape(weight.shape).to(weight.dtype)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W H (the bias is untouched)."""
        return self._reflect_weight(adapter_name, weight, inverse=False), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W H^T = W H^-1."""
        return self._reflect_weight(adapter_name, weight, inverse=True), bias

    # ------------------------------------------------------------------ peft's scaling API (a no-op for HRA)
    def scale_layer(self, scale: float) -> None:
        if scale != 1 and self._active_here():
            warnings.warn(SCALE_WARNING, stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        if self._active_here():
            warnings.warn(UNSCALE_WARNING, stacklevel=2)

    def _adapters_off(self) -> bool:
        """Whether the forward is the base layer's alone (adapters disabled -- unmerging first -- or merged)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return True
        return self.merged or not self._active_here()

    def __repr__(self) -> str:
        return "hra." + super().__repr__()


class HRALinear(HRALayer):
    """HRA on `nn.Linear` or a quantized linear layer: `y = base(x H^T)`."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Reflect the input by each active adapter (the last one first: the order merging composes them)."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        hidden = x.to(compute_dtype(self.hra_u[self._active_here()[0]].dtype))
        for name in reversed(self._active_here()):
            v, t = self._factors(name)
            hidden = reflect_rows(hidden.to(v.dtype), v, t, transpose=True)
        base = self.base_layer
        if is_plain_linear(base) and not (args or kwargs):
            # As peft: the product runs in the adapter's precision (float32 over half-precision bases).
            bias = None if base.bias is None else base.bias.to(hidden.dtype)
            return F.linear(hidden, base.weight.to(hidden.dtype), bias).to(previous_dtype)
        return base(hidden.to(previous_dtype), *args, **kwargs).to(previous_dtype)


class HRAConv2d(HRALayer):
    """HRA on `nn.Conv2d`: each filter's receptive field (in_channels * kh * kw) is reflected, `conv(x, W H)`."""

    def _init_geometry(self, base: nn.Module) -> None:
        if base.groups > 1:
            raise TargetModulesError(
                f"HRA does not support Conv2d layers with groups > 1 (got groups={base.groups}); "
                "exclude this module via exclude_modules."
            )
        self.in_features, self.out_features = base.in_channels, base.out_channels

    @property
    def reflected_features(self) -> int:
        kernel_height, kernel_width = self.get_base_layer().kernel_size
        return self.in_features * kernel_height * kernel_width

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base convolution with its kernel reflected by each active adapter, in merge order."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        base = self.get_base_layer()  # (nn.Conv2d.forward takes no other arguments)
        dtype = compute_dtype(self.hra_u[self._active_here()[0]].dtype)
        flat = base.weight.reshape(self.out_features, -1).to(dtype)
        for name in self._active_here():
            v, t = self._factors(name)
            flat = reflect_rows(flat.to(v.dtype), v, t)
        bias = None if base.bias is None else base.bias.to(flat.dtype)
        return base._conv_forward(x.to(flat.dtype), flat.reshape(base.weight.shape), bias).to(previous_dtype)


def _is_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) or is_quantized(base)


# ---------------------------------------------------------------------- dispatchers (HRAModel.dispatchers)
dispatch_conv2d = wraps(nn.Conv2d, HRAConv2d)
dispatch_linear = wraps(_is_linear, HRALinear)
