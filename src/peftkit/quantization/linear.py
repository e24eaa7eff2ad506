r"""Quantized linear layers: packed frozen weights, dequantized on the fly in `compute_dtype`.

    y = x W^T + b,   W = dequantize(packed)   (never stored: rebuilt in forward and in backward)

`QuantizedMatmul` is the autograd function behind both layers: forward saves nothing but the layer,
backward dequantizes W again for `grad_x = grad_y W`. The weight is frozen, so no grad for it; the
full-model dequantized weights are never alive at once, only one layer's at a time.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .formats import (
    BLOCKSIZE_4BIT,
    QUANT_TYPES,
    QuantState4bit,
    dequantize_4bit,
    dequantize_int8_rowwise,
    quantize_4bit,
    quantize_int8_rowwise,
)

DTypeLike = Union[str, torch.dtype, None]


def as_dtype(value: DTypeLike, default: torch.dtype = torch.float32) -> torch.dtype:
    """`torch.bfloat16`, "bfloat16" or "torch.bfloat16" -> torch.bfloat16; None -> `default`."""
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"compute dtype {value!r} is not a torch floating dtype; use 'float32', 'bfloat16' or 'float16'.")
    return dtype


class QuantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantized from `layer` in forward and again in backward (nothing cached)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "QuantizedLinearBase") -> torch.Tensor:
        ctx.layer = layer
        ctx.input_dtype = x.dtype
        weight = layer.dequantize_weight(layer.compute_dtype)
        return x.to(layer.compute_dtype) @ weight.T

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        weight = layer.dequantize_weight(layer.compute_dtype)
        return (grad_output.to(layer.compute_dtype) @ weight).to(ctx.input_dtype), None


class QuantizedLinearBase(nn.Module):
    """What `Linear4bit` and `Linear8bit` share: shapes, bias, compute dtype and the forward."""

    weight: nn.Parameter

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "QuantizedLinearBase":
        """Quantize `linear`'s weight (its bias stays in the weight's float dtype)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, **kwargs)
        layer.requantize_(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: DTypeLike) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = as_dtype(compute_dtype)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W as a dense (out, in) tensor in `dtype` (the compute dtype by default)."""
        raise NotImplementedError

    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored codes by those of the dense (out, in) `weight` (used by merging)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = QuantizedMatmul.apply(x, self)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output.to(x.dtype) if x.is_floating_point() else output

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain `nn.Linear` with the dequantized weight (compute dtype by default)."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


class Linear4bit(QuantizedLinearBase):
    """A linear layer whose frozen weight is stored as packed NF4/FP4 codes.

    `weight` is a uint8 parameter of shape (ceil(out * in / 2), 1) (two codes a byte, as
    bitsandbytes' `Params4bit`), flagged `peftkit_numel_factor = 2` so parameter counts see the
    logical out * in values. Buffers: `absmax` (float32 per block, or uint8 with double
    quantization), `absmax_offset` and `nested_absmax` (double quantization only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: DTypeLike = torch.float32,
        quant_type: str = "nf4",
        double_quant: bool = False,
        blocksize: int = BLOCKSIZE_4BIT,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={quant_type!r} is not supported; use 'nf4' or 'fp4'.")
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.blocksize = blocksize
        self.requantize_(torch.zeros(out_features, in_features, device=device))
        if self.bias is not None and device is not None:
            self.bias.data = self.bias.data.to(device)

    def quant_state(self) -> QuantState4bit:
        double = self.double_quant
        return QuantState4bit(
            shape=torch.Size((self.out_features, self.in_features)), quant_type=self.quant_type,
            blocksize=self.blocksize, absmax=self.absmax,
            offset=self.absmax_offset if double else None, nested_absmax=self.nested_absmax if double else None,
        )

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_4bit(self.weight, self.quant_state(), dtype or self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        packed, state = quantize_4bit(weight, self.quant_type, self.blocksize, self.double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight.peftkit_numel_factor = 2
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax_offset", state.offset.reshape(1) if self.double_quant else None)
        self.register_buffer("nested_absmax", state.nested_absmax)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}, double_quant={self.double_quant}"


class Linear8bit(QuantizedLinearBase):
    """A linear layer whose frozen weight is int8 with one float32 absmax per output row (`weight_scale`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: DTypeLike = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.requantize_(torch.zeros(out_features, in_features, device=device))
        if self.bias is not None and device is not None:
            self.bias.data = self.bias.data.to(device)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int8_rowwise(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        codes, row_absmax = quantize_int8_rowwise(weight)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scale", row_absmax)
