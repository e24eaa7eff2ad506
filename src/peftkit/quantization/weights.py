r"""The dense weight of any base layer, read and written the same way whatever stores it.

Merging an adapter is arithmetic on the base weight `W` (and bias `b`): `W <- W + delta_W`
(LoRA, LoHa, LoKr, AdaLoRA), `W <- diag(l) W` ((IA)^3), `W <- m * V / ||V||` (DoRA). The tuner
layers do that arithmetic once (`BaseTunerLayer.merge`) on what this module reads:

    base layer                         read_weight(base)            write_weight(base, W, b)
    nn.Linear / Conv1D / Conv / Emb.   the parameter itself         copied in place (same storage)
    peftkit Linear4bit / Linear8bit    dequantized, float32         re-quantized (rounds; warns)
    bitsandbytes Linear4bit / 8bitLt   decoded from codes, float32  re-quantized (rounds; warns)

Packed codes cannot be added to in place, so a quantized merge rounds: merged outputs differ from
unmerged ones by about one quantization step. For an exact merge into dense weights, call
`peftkit.quantization.dequantize_model(model)` first.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from . import bnb
from .linear import QuantizedLinearBase

REQUANTIZE_WARNING = (
    "Merging into a quantized base weight dequantizes, adds the adapter and re-quantizes it; rounding makes "
    "the merged model differ slightly from the unmerged one. Call peftkit.quantization.dequantize_model() "
    "first for an exact merge into dense weights."
)


def is_quantized(base: nn.Module) -> bool:
    """Whether `base` is a quantized linear layer (peftkit's or bitsandbytes'): its weight is codes, not values."""
    return isinstance(base, QuantizedLinearBase) or bnb.is_bnb_linear(base)


def read_weight(base: nn.Module) -> torch.Tensor:
    """`base`'s weight as values, in its stored layout: the live parameter, or a float32 (out, in) copy."""
    if isinstance(base, QuantizedLinearBase):
        return base.dequantize_weight(torch.float32)
    if bnb.is_bnb_linear(base):
        return bnb.dequantize(base)
    return base.weight


def read_bias(base: nn.Module) -> Optional[torch.Tensor]:
    """`base`'s bias (None when it has none); biases are never quantized."""
    return getattr(base, "bias", None)


def write_weight(base: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    """Store `weight` (and `bias`, if given) into `base`; a dense weight is updated in place.

    In place on the parameter itself (not `.data`), so its storage is kept (tied weights, FSDP
    views) and its version counter moves (caches keyed on it see the change).
    """
    with torch.no_grad():
        if is_quantized(base):
            warnings.warn(REQUANTIZE_WARNING, stacklevel=4)
            if isinstance(base, QuantizedLinearBase):
                base.requantize_(weight)
            else:
                bnb.requantize(base, weight)
        elif weight is not base.weight:
            base.weight.copy_(weight)
        if bias is not None and bias is not base.bias:
            base.bias.copy_(bias)
