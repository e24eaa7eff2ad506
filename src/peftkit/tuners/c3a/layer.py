r"""C3A layers: a frozen base layer plus a block-circulant update applied with FFTs.

With block size b, a target of shape (out, in) has m = out / b by n = in / b blocks; adapter
kernel w (m, n, b) (saved as `...c3a_kernel`) defines each block as a circulant matrix:

    C(w_mn)[i, j] = w_mn[(j - i) mod b]              (b, b): a circular cross-correlation
    delta_W = [C(w_mn)]_{m, n} / in                  (out, in)

    y = W x + delta_W x,   y_m = sum_n irfft(conj(rfft(w_mn)) * rfft(x_n)) / in

computed in float32 (FFTs of half precision are not generally available). The kernel is
float32 too; `init_weights` draws it (xavier_uniform by default), True gives zeros (a no-op).

Several active adapters add their updates (peft 0.21.2 instead feeds each adapter the previous
adapter's output, which fails unless in == out; merging adds them in both libraries).
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ...quantization.weights import is_quantized
from .._core.base_layers import is_transposed, wraps
from .._core.layer import BaseTunerLayer

#: Below this block size the update is applied as one dense (out, in) matmul: the FFTs' overhead
#: outweighs their saving (b log b vs b^2 per block and token) for tiny blocks.
DENSE_BELOW_BLOCK_SIZE = 16


def circulant_weight(kernel: torch.Tensor) -> torch.Tensor:
    """The (m * b, n * b) block-circulant matrix of `kernel` (m, n, b): block (m, n) is C(kernel[m, n])."""
    rows, cols, size = kernel.shape
    positions = torch.arange(size, device=kernel.device)
    shifts = (positions.unsqueeze(0) - positions.unsqueeze(1)) % size  # [i, j] = (j - i) mod b
    return kernel[:, :, shifts].permute(0, 2, 1, 3).reshape(rows * size, cols * size)


def block_circular_correlation(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`x @ circulant_weight(kernel).T` through real FFTs: x (..., n * b) -> (..., m * b)."""
    rows, cols, size = kernel.shape
    spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], cols, size))
    mixed = torch.einsum("...nf,mnf->...mf", spectrum, torch.fft.rfft(kernel).conj())
    return torch.fft.irfft(mixed, n=size).reshape(*x.shape[:-1], rows * size)


class C3ALayer(BaseTunerLayer, nn.Module):
    """C3A on `nn.Linear` (and transformers' `Conv1D`, a peftkit extension): `y = W x + delta_W x`."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("c3a_kernel",)
    other_param_names = ("block_size",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = is_transposed(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.c3a_kernel = nn.ParameterDict({})
        self.block_size: dict[str, int] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(
        self, adapter_name: str, block_size: int, init_weights: Union[bool, str] = "xavier_uniform"
    ) -> None:
        """Add adapter `adapter_name`: an (out / b, in / b, b) float32 kernel, drawn per `init_weights`."""
        if block_size <= 0:
            raise ConfigError(f"`block_size` should be a positive integer value but the value passed is {block_size}")
        for what, features in (("input", self.in_features), ("output", self.out_features)):
            if features % block_size != 0:
                raise ConfigError(
                    f"The block size should be a factor of the {what} size. However, the {what} size is {features} "
                    f"and the block size is {block_size}; pick a block_size (or a block_size_pattern entry) that "
                    "divides both sizes of this module."
                )
        kernel = torch.zeros(self.out_features // block_size, self.in_features // block_size, block_size)
        _initialise(kernel, init_weights, self.in_features, self.out_features)
        # peft builds the kernel in float32, then casts it to the base dtype and (autocast) back: same rounding.
        weight = self.get_base_layer().weight
        if weight.is_floating_point():
            kernel = kernel.to(weight.dtype).to(torch.float32)
        self.block_size[adapter_name] = block_size
        self.c3a_kernel[adapter_name] = nn.Parameter(kernel)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.c3a_kernel]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's `delta_W x`, computed in float32."""
        if self._disable_adapters and self.merged:
            self.unmerge()
        if self._disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if not active:
            return result
        inputs = x.to(torch.float32)
        update = None
        for name in active:
            kernel = self.c3a_kernel[name].to(torch.float32)
            if self.block_size[name] < DENSE_BELOW_BLOCK_SIZE:
                term = inputs @ circulant_weight(kernel).T
            else:
                term = block_circular_correlation(inputs, kernel)
            update = term if update is None else update + term
        return (result + (update / self.in_features).to(result.dtype)).to(x.dtype)

    # ------------------------------------------------------------------ merging (additive)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = block-circulant(kernel) / in, (out, in); transposed for Conv1D bases; the base's dtype."""
        delta = circulant_weight(self.c3a_kernel[adapter_name].to(torch.float32)) / self.in_features
        delta = delta.T if self.fan_in_fan_out else delta
        weight = self.get_base_layer().weight
        return delta.to(weight.dtype) if weight.is_floating_point() else delta

    def __repr__(self) -> str:
        return "c3a." + super().__repr__()


@torch.no_grad()
def _initialise(kernel: torch.Tensor, init_weights: Union[bool, str], fan_in: int, fan_out: int) -> None:
    """peft's kernel inits: True zeros; gaussian N(0, 1); xavier_uniform (or False); kaiming_uniform."""
    if init_weights is True:
        return
    if init_weights == "gaussian":
        nn.init.normal_(kernel)
    elif init_weights in ("xavier_uniform", False):
        bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
        nn.init.uniform_(kernel, -bound, bound)
    elif init_weights == "kaiming_uniform":
        bound = math.sqrt(1.0 / float(fan_in))
        nn.init.uniform_(kernel, -bound, bound)
    else:
        raise ConfigError(
            f"Unknown init_weights: {init_weights!r}; use 'xavier_uniform', 'kaiming_uniform', 'gaussian' or True."
        )


def _is_dense_linear(base: nn.Module) -> bool:
    return isinstance(base, (nn.Linear, Conv1D)) and not is_quantized(base)


# ---------------------------------------------------------------------- dispatchers (C3AModel.dispatchers)
dispatch_linear = wraps(_is_dense_linear, C3ALayer)
SUPPORTED_LAYERS = "`torch.nn.Linear` (and transformers' Conv1D)"
