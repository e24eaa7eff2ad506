r"""A one-level 2-D inverse discrete wavelet transform in pure PyTorch, written as two 1-D synthesis maps.

peft reconstructs delta_W from an (H x W) coefficient matrix S split in quadrants

    S = [[cA, cH],            cA: low/low    cH: high rows, low columns
         [cV, cD]]            cV: low rows, high columns    cD: high/high

with the transposed convolution (stride 2) by the four outer products of the synthesis filters
(h: low-pass, g: high-pass, length L), then crops `p = (2L - 3) // 2` from every side and takes a
centred (out x in) window. Every one of those steps is separable, so

    delta = R P C^T        R: (out x H) row synthesis,  C: (in x W) column synthesis

where P is S with its off-diagonal quadrants swapped (P = [[cA, cV], [cH, cD]]): a coefficient's row
filter is chosen by its *column* half and its column filter by its *row* half. One 1-D synthesis
map takes 2 * half coefficients (h-part, then g-part) to `length` samples:

    synth(z)[a] = sum_j z_h[j] h[a + o - 2j] + z_g[j] g[a + o - 2j]      (o: the crop offset)

`synthesize` applies it along the last dimension (a transposed conv1d), `analyze` its adjoint
(a strided conv1d, used to push inputs x through C^T without forming delta_W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .filters import RECONSTRUCTION_LOWPASS

#: Families WaveFT accepts -> (rows, columns) peft pads the coefficient matrix by (`L - 2` each).
WAVELET_REDUCTIONS: dict[str, tuple[int, int]] = {
    name: (len(lowpass) - 2, len(lowpass) - 2) for name, lowpass in RECONSTRUCTION_LOWPASS.items()
}


def filter_length(family: str) -> int:
    """L, the number of taps of the family's filters."""
    return len(RECONSTRUCTION_LOWPASS[family])


def synthesis_filters(family: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 1, L): the low-pass h and the high-pass `g[i] = (-1)^i h[L - 1 - i]`, as conv weights."""
    lowpass = torch.tensor(RECONSTRUCTION_LOWPASS[family], dtype=torch.float64)
    signs = torch.ones(len(lowpass), dtype=torch.float64)
    signs[1::2] = -1
    highpass = signs * lowpass.flip(0)
    return torch.stack([lowpass, highpass]).unsqueeze(1).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Axis:
    """One dimension of the reconstruction: `size` samples from `2 * half` coefficients.

    `pad` is peft's padding of that dimension (the original data is centred in it, at `shift`);
    `offset` is where the kept samples start in the full transposed-conv output.
    """

    size: int
    half: int
    shift: int
    offset: int

    @classmethod
    def of(cls, size: int, filter_length: int) -> "Axis":
        padded = size + filter_length - 2
        padded += padded % 2
        crop = (2 * filter_length - 3) // 2
        reconstructed = padded + filter_length - 2 - 2 * crop
        return cls(size=size, half=padded // 2, shift=(padded - size) // 2, offset=crop + (reconstructed - size) // 2)

    @property
    def coefficients(self) -> int:
        return 2 * self.half


def synthesize(z: torch.Tensor, filters: torch.Tensor, axis: Axis) -> torch.Tensor:
    """(..., 2 * half) coefficients -> (..., size) samples along the last dimension."""
    lead = z.shape[:-1]
    channels = z.reshape(-1, 2, axis.half)
    full = F.conv_transpose1d(channels, filters, stride=2)
    return full[:, 0, axis.offset : axis.offset + axis.size].reshape(*lead, axis.size)


def analyze(x: torch.Tensor, filters: torch.Tensor, axis: Axis) -> torch.Tensor:
    """The adjoint of `synthesize`: (..., size) -> (..., 2 * half)."""
    lead = x.shape[:-1]
    full_length = 2 * axis.half + filters.shape[-1] - 2
    padded = F.pad(x.reshape(-1, 1, axis.size), (axis.offset, full_length - axis.offset - axis.size))
    return F.conv1d(padded, filters, stride=2).reshape(*lead, axis.coefficients)


def swapped_positions(rows: torch.Tensor, cols: torch.Tensor, row_axis: Axis, col_axis: Axis) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in P (see the module docstring) of coefficients at (rows, cols) of the data grid."""
    rows, cols = rows + row_axis.shift, cols + col_axis.shift
    col_high, row_high = cols >= col_axis.half, rows >= row_axis.half
    p_rows = rows % row_axis.half + col_high.long() * row_axis.half
    p_cols = cols % col_axis.half + row_high.long() * col_axis.half
    return p_rows, p_cols


def reconstruct(p_matrix: torch.Tensor, filters: torch.Tensor, row_axis: Axis, col_axis: Axis) -> torch.Tensor:
    """R P C^T: (H x W) swapped coefficients -> (out x in) samples."""
    return synthesize(synthesize(p_matrix, filters, col_axis).T, filters, row_axis).T
