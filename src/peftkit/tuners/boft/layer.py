r"""BOFT layers: a frozen base layer whose input space is rotated by R and whose outputs are scaled by s.

    Linear (and quantized linear):  y = s * (W (x R)) + b = ((W R^T) * s) x + b       n = in_features
    Conv2d:                          y = conv(x, (W R^T) * s) + b       W viewed (out, in_channels * kh * kw)

R is the butterfly product of `butterfly.py` (from `boft_R`, (N, D, H, H)); s is `boft_s`, one
factor per output (saved (out, 1) for Linear, (1, out) for Conv2d, as peft). With
`init_weights=True` the blocks start at zero (R = I) and s at one: a new adapter is a no-op.
Checkpoint keys: `<module>.boft_R`, `<module>.boft_s`; nothing else is saved (peft's dense
permutation buffer `boft_P` is not needed: the permutations are reshapes).

Where R is applied: for a Linear on the input (`x R`, tokens * n * H * N multiply-adds), which
leaves the (possibly quantized) base layer untouched; for a Conv2d on the kernel (every receptive
field of the input would be k^2 times more rows). Merging rotates and scales the weight; unmerging
divides by s and applies R (R is orthogonal: (W R^T) R = W). R is never formed as an n x n matrix
except for peft's `get_delta_weight` API.

Several active adapters on one layer compose in the order merging folds them,
W ((R_1 R_2 ...)^T) * s_1 * s_2 ..., so merged and unmerged outputs agree; for a Linear the last
active adapter's rotation meets the input first (peft's order).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError, TargetModulesError
from ...quantization.weights import is_quantized
from .._core.base_layers import wraps
from .._core.layer import BaseTunerLayer
from .butterfly import MultiplicativeDropoutLayer, butterfly_rows, cayley_blocks, dense_rotation

SUPPORTED_LAYERS = "torch.nn.Linear, torch.nn.Conv2d and quantized linear layers"
SCALE_WARNING = "Scaling operation for BOFT not supported! Automatically set scale to 1."
UNSCALE_WARNING = "Unscaling operation for BOFT not supported! Keeping scale to 1."


class GroupedConvError(TargetModulesError, NotImplementedError):
    """A grouped Conv2d: BOFT rotates whole receptive fields (peft raises NotImplementedError)."""


def resolve_butterfly(
    dim: int, block_size: int, block_num: int, factors: int, conv: bool = False
) -> tuple[int, int]:
    """(block size H, block count D) with H * D = dim for `factors` butterfly factors, or peft's error.

    `dim` is in_features (Linear) or in_channels * kh * kw (Conv2d, `conv=True`: peft's wording).
    """
    what = f"Convolutional kernel dimension ({dim})" if conv else f"in_features ({dim})"
    combination = f"convolutional kernel dimension ({dim})" if conv else f"in_features ({dim})"
    extra = factors - 1  # peft's (and the paper's) count: the factors besides the first
    if block_size == 0 and block_num != 0:
        if dim % block_num != 0:
            raise ConfigError(f"{what} must be divisible by boft_block_num ({block_num})!")
        if extra != 0:
            if extra > int(math.log2(block_num)):
                raise ConfigError(
                    f"Invalid combination of boft_n_butterfly_factor ({factors}) and boft_block_num ({block_num})!"
                )
            if block_num % (2**extra) != 0:
                raise ConfigError(
                    f"boft_block_num ({block_num}) must be a multiple of 2 raised to the power of "
                    f"boft_n_butterfly_factor ({factors})!"
                )
        block_size = dim // block_num
    elif block_size != 0 and block_num == 0:
        if dim % block_size != 0:
            raise ConfigError(f"{what} must be divisible by boft_block_size ({block_size})!")
        if extra != 0 and (dim < block_size * 2**extra or dim % (block_size * 2**extra) != 0):
            raise ConfigError(
                f"Invalid combination of {combination}, boft_n_butterfly_factor ({factors}) and "
                f"boft_block_size ({block_size})!"
            )
        block_num = dim // block_size
    else:
        raise ConfigError(
            f"Exactly one of boft_block_size ({block_size}) and boft_block_num ({block_num}) must be non-zero."
        )
    if extra != 0:
        if block_num % 2 != 0:
            raise ConfigError(f"boft_block_num ({block_num}) must be an even number!")
        if block_size % 2 != 0:
            raise ConfigError(f"boft_block_size ({block_size}) must be an even number!")
    return block_size, block_num


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merging arithmetic runs in float32 at least."""
    return torch.promote_types(dtype, torch.float32)


class BOFTLayer(BaseTunerLayer, nn.Module):
    """What every BOFT layer shares: per adapter `boft_R` (N, D, H, H) and `boft_s`, multiplicative merging."""

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")
    #: Conv2d layers: `boft_s` is saved (1, out) rather than (out, 1), and errors name the kernel dimension.
    is_conv = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.boft_R = nn.ParameterDict({})
        self.boft_s = nn.ParameterDict({})
        self.boft_dropout = nn.ModuleDict({})
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.cast_input_dtype_enabled = True
        self._init_geometry(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ geometry (per layer kind)
    def _init_geometry(self, base: nn.Module) -> None:
        """Set `in_features` / `out_features` from the wrapped base layer."""
        raise NotImplementedError

    @property
    def rotated_features(self) -> int:
        """n: the dimension R acts on."""
        return self.in_features

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        boft_block_size: int = 4,
        boft_block_num: int = 0,
        boft_n_butterfly_factor: int = 1,
        boft_dropout: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: N factors of D blocks of size H (D * H = n)."""
        if boft_n_butterfly_factor < 1:
            raise ConfigError(
                f"You can only specify boft_n_butterfly_factor {boft_n_butterfly_factor} to be a positive integer number."
            )
        block_size, block_num = resolve_butterfly(
            self.rotated_features, boft_block_size, boft_block_num, boft_n_butterfly_factor, conv=self.is_conv
        )
        self.boft_dropout[adapter_name] = (
            MultiplicativeDropoutLayer(p=boft_dropout) if boft_dropout > 0.0 else nn.Identity()
        )
        self._create_parameters(adapter_name, boft_n_butterfly_factor, block_num, block_size)
        self.reset_boft_parameters(adapter_name, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def _create_parameters(self, adapter_name: str, factors: int, block_num: int, block_size: int) -> None:
        scale_shape = (1, self.out_features) if self.is_conv else (self.out_features, 1)
        self.boft_R[adapter_name] = nn.Parameter(torch.zeros(factors, block_num, block_size, block_size))
        self.boft_s[adapter_name] = nn.Parameter(torch.ones(scale_shape))
        self.boft_block_size[adapter_name] = block_size
        self.boft_block_num[adapter_name] = block_num

    def refit_factors(self, adapter_name: str, factors: int) -> None:
        """Rebuild `adapter_name` with `factors` butterfly factors of the same blocks (loading a checkpoint
        saved with another count, e.g. by peft without its CUDA extension, which always uses one)."""
        old = self.boft_R[adapter_name]
        block_size, block_num = resolve_butterfly(
            self.rotated_features, self.boft_block_size[adapter_name], 0, factors, conv=self.is_conv
        )
        shape = (factors, block_num, block_size, block_size)
        self.boft_R[adapter_name] = nn.Parameter(
            torch.zeros(shape, device=old.device, dtype=old.dtype), requires_grad=old.requires_grad
        )

    def reset_boft_parameters(self, adapter_name: str, init_weights: Any = True) -> None:
        """True: blocks 0 (R = I), s = 1 (a no-op); False: blocks N(0, 0.1^2), s N(1, 0.1^2)."""
        if adapter_name not in self.boft_R:
            return
        if init_weights is False:
            nn.init.normal_(self.boft_R[adapter_name], mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s[adapter_name], mean=1.0, std=0.1)
        elif init_weights is True:
            nn.init.zeros_(self.boft_R[adapter_name])
            nn.init.ones_(self.boft_s[adapter_name])
        else:
            raise ConfigError(f"Unknown initialization {init_weights=}")

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.boft_R]

    def rotations(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (N, D, H, H) Cayley rotations of `adapter_name` (computed from a `dtype` copy when given)."""
        params = self.boft_R[adapter_name]
        return cayley_blocks(params if dtype is None else params.to(dtype))

    def output_scale(self, adapter_name: str) -> torch.Tensor:
        """s of `adapter_name` as a column (out, 1), whatever layout it is saved in."""
        scale = self.boft_s[adapter_name]
        return scale.transpose(0, 1) if self.is_conv else scale

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """peft's API: (the dense n x n rotation R, s as (out, 1)). BOFT's merge multiplies, see `fold`."""
        return dense_rotation(self.rotations(adapter_name)), self.output_scale(adapter_name)

    # ------------------------------------------------------------------ merging (multiplicative)
    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- (W R^T) * s (W viewed (out, n); the bias is untouched)."""
        dtype = _compute_dtype(self.boft_R[adapter_name].dtype)
        flat = weight.reshape(weight.shape[0], -1).to(dtype)
        rotated = butterfly_rows(flat, self.rotations(adapter_name, dtype), transpose=True)
        scaled = rotated * self.output_scale(adapter_name).to(dtype)
        return scaled.reshape(weight.shape).to(weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- (W / s) R: R is orthogonal, so this undoes `fold`."""
        dtype = _compute_dtype(self.boft_R[adapter_name].dtype)
        flat = weight.reshape(weight.shape[0], -1).to(dtype) / self.output_scale(adapter_name).to(dtype)
        restored = butterfly_rows(flat, self.rotations(adapter_name, dtype))
        return restored.reshape(weight.shape).to(weight.dtype), bias

    # ------------------------------------------------------------------ peft's scaling API (a no-op for BOFT)
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.boft_R:
            warnings.warn(SCALE_WARNING, stacklevel=2)

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

    def _training_rotations(self, adapter_name: str) -> torch.Tensor:
        """The rotations the forward uses: with the adapter's multiplicative dropout (training only)."""
        return self.boft_dropout[adapter_name](self.rotations(adapter_name))

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


class Linear(BOFTLayer):
    """BOFT on `nn.Linear` or a quantized linear layer: `y = s * (base(x R) - b) + b`."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rotate the input by the active adapters (last one first: merge order), scale the outputs."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        active = self._active_here()
        hidden, scale = x, None
        for name in reversed(active):
            rotations = self._training_rotations(name)
            hidden = butterfly_rows(hidden.to(rotations.dtype), rotations)
        for name in active:
            scale = self.boft_s[name] if scale is None else scale * self.boft_s[name]
        result = self.base_layer(hidden.to(previous_dtype), *args, **kwargs)
        bias = getattr(self.get_base_layer(), "bias", None)
        if bias is None:
            result = result * scale.squeeze(-1)
        else:
            result = (result - bias) * scale.squeeze(-1) + bias
        return result.to(previous_dtype)


class Conv2d(BOFTLayer):
    """BOFT on `nn.Conv2d`: each filter (in_channels * kh * kw) is rotated and scaled, `conv(x, (W R^T) * s)`."""

    is_conv = True

    def _init_geometry(self, base: nn.Module) -> None:
        if getattr(base, "groups", 1) > 1:
            raise GroupedConvError(
                f"BOFT does not support {type(base).__name__} layers with groups > 1 (got groups={base.groups}); "
                "exclude this module via exclude_modules."
            )
        self.in_features, self.out_features = base.in_channels, base.out_channels

    @property
    def rotated_features(self) -> int:
        kernel_height, kernel_width = self.get_base_layer().kernel_size
        return self.in_features * kernel_height * kernel_width

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base convolution with its kernel rotated and scaled by each active adapter, in merge order."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()  # (nn.Conv2d.forward takes no other arguments)
        previous_dtype = x.dtype
        flat = base.weight.reshape(base.weight.shape[0], -1)
        for name in self._active_here():
            rotations = self._training_rotations(name)
            flat = butterfly_rows(flat.to(rotations.dtype), rotations, transpose=True) * self.output_scale(name)
        weight = flat.reshape(base.weight.shape).to(base.weight.dtype)
        return base._conv_forward(x.to(weight.dtype), weight, base.bias).to(previous_dtype)


def _is_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) or is_quantized(base)


# ---------------------------------------------------------------------- dispatchers (BOFTModel.dispatchers)
dispatch_conv2d = wraps(nn.Conv2d, Conv2d)
dispatch_linear = wraps(_is_linear, Linear)
