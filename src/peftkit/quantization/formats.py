r"""Quantization formats: 4-bit NF4 / FP4 blockwise, 8-bit dynamic blockwise, int8 per-row.

4-bit (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): the flattened weight is cut
into blocks of `blocksize` (64) values; each block keeps its absmax `a` and every value the index of
the code nearest to `w / a`:

    q_i = argmin_k |w_i / a - code[k]|,     w_i ~= code[q_i] * a

Two indices share a byte, the first in the high nibble (bitsandbytes' layout, so the bytes match).

Double quantization stores the fp32 absmax constants themselves in 8 bits: subtract their mean, then
quantize blocks of 256 with the signed "dynamic" 8-bit code (a tree of decimal exponents with a
linear fraction), keeping one fp32 absmax per 256 constants. Cost per weight: 4 + 8/64 + 32/(64*256)
bits, about 0.129x the fp32 bytes.

Int8 (LLM.int8()): one absmax per output row, `q = round(127 w / a_row)`, `w ~= q a_row / 127`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

#: The 16 NormalFloat-4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: FP4 (1 sign, 2 exponent, 1 mantissa bits) in bitsandbytes' index order, divided by its max (12).
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(-m / 12.0 for m in _FP4_MAGNITUDES)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE_4BIT = 64
BLOCKSIZE_NESTED = 256


def code_4bit(quant_type: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """The 16 code values of `quant_type` ("nf4" or "fp4") as float32, indexed by 4-bit code."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not a 4-bit type; use 'nf4' or 'fp4'.")
    values = NF4_CODE if quant_type == "nf4" else FP4_CODE
    return torch.tensor(values, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _dynamic_code_values() -> tuple[float, ...]:
    """The signed 8-bit dynamic code (256 sorted values in [-1, 1]).

    For exponent e = 0..6 there are 2**e fraction steps: the midpoints of an even grid over
    [0.1, 1], scaled by 10**(e - 6), with both signs; plus 0 and 1, and zeros to fill 256 slots.
    Built in float32 like the reference so the values agree bit for bit.
    """
    values: list[float] = []
    for exponent in range(7):
        grid = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        midpoints = (grid[:-1] + grid[1:]) / 2.0
        scale = 10.0 ** (exponent - 6)
        values += (scale * midpoints).tolist() + (-scale * midpoints).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return tuple(sorted(values))


def dynamic_code(device: Optional[torch.device] = None) -> torch.Tensor:
    return torch.tensor(_dynamic_code_values(), dtype=torch.float32, device=device)


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """`flat` zero-padded to whole blocks, viewed (blocks, blocksize); and the original length."""
    n = flat.numel()
    pad = (-n) % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize), n


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each entry; ties go to the smaller code value."""
    order = torch.argsort(code)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


def _scale_blocks(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    blocks, n = _blocks(weight.detach().reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Times the reciprocal (not divided): bitsandbytes' CUDA and PyTorch kernels round this way.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    return scaled, absmax, n


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = BLOCKSIZE_NESTED) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 8-bit codes (uint8, shaped like `values`) and one float32 absmax per block."""
    scaled, absmax, _ = _scale_blocks(values, blocksize)
    codes = _nearest_code(scaled, dynamic_code(values.device)).to(torch.uint8)
    return codes.view(values.shape), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = BLOCKSIZE_NESTED) -> torch.Tensor:
    """float32 values: `dynamic_code[q] * absmax[block]`."""
    values = dynamic_code(codes.device)[codes.reshape(-1).long()]
    blocks, n = _blocks(values, blocksize)
    return (blocks * absmax.unsqueeze(1)).reshape(-1)[:n].view(codes.shape)


@dataclass
class QuantState4bit:
    """What dequantizing a packed 4-bit weight needs besides the bytes.

    `absmax` is float32 (one per block), or with double quantization the uint8 codes of
    `absmax - offset`, whose own float32 scales are `nested_absmax` (one per 256 constants).
    """

    shape: torch.Size
    quant_type: str
    blocksize: int
    absmax: torch.Tensor
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_values(self) -> torch.Tensor:
        """The per-block absmax as float32, undoing double quantization when used."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax) + self.offset


def quantize_4bit(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE_4BIT, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState4bit]:
    """Pack `weight` into 4-bit codes: uint8 of shape (ceil(numel / 2), 1) and its `QuantState4bit`."""
    code = code_4bit(quant_type, weight.device)
    scaled, absmax, n = _scale_blocks(weight, blocksize)
    if n % 2:  # an odd tail is padded with the code of 0, as bitsandbytes does
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    indices = _nearest_code(scaled, code).to(torch.uint8)
    packed = ((indices[0::2] << 4) | indices[1::2]).unsqueeze(1)
    state = QuantState4bit(shape=weight.shape, quant_type=quant_type, blocksize=blocksize, absmax=absmax)
    if double_quant:
        offset = absmax.mean()
        state.absmax, state.nested_absmax = quantize_blockwise_8bit(absmax - offset)
        state.offset = offset
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back from its packed codes: `code[q] * absmax[block]`, shaped `state.shape`."""
    flat = packed.reshape(-1)
    indices = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1).long()
    values = code_4bit(state.quant_type, packed.device)[indices]
    blocks, _ = _blocks(values, state.blocksize)
    n = math.prod(state.shape)
    weight = (blocks * state.absmax_values().unsqueeze(1)).reshape(-1)[:n]
    return weight.view(state.shape).to(dtype)


def quantize_int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes `round(127 w / a_row)` and the float32 row absmax `a_row` of a 2-D weight."""
    weight = weight.detach().float()
    row_absmax = weight.abs().amax(dim=1)
    codes = torch.round(weight * (127.0 / row_absmax.clamp(min=1e-38).unsqueeze(1))).to(torch.int8)
    return codes, row_absmax


def dequantize_int8_rowwise(codes: torch.Tensor, row_absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * a_row / 127`."""
    return (codes.float() * (row_absmax.float().unsqueeze(1) / 127.0)).to(dtype)
