r"""BOFT's rotation: a product of butterfly factors, each a permuted block-diagonal Cayley rotation.

A layer's rotated dimension n (in_features; for Conv2d in_channels * kh * kw) is cut into D blocks
of size H (D * H = n). An adapter holds `boft_R` of shape (N, D, H, H): N butterfly factors of D
unconstrained blocks each. Block A becomes a rotation by the Cayley transform of its skew part

    S = (A - A^T) / 2,      Q = (I - S)(I + S)^-1               (orthogonal; A = 0 gives Q = I)

and factor i (0 <= i < N) is the block-diagonal matrix of its D rotations, conjugated by the
butterfly permutation P_i:

    B_i = P_i diag(Q_i1, ..., Q_iD) P_i^T          R = B_(N-1) ... B_1 B_0          (n x n, orthogonal)

P_i (peft's `block_butterfly_perm`): cut the vector into groups of 2^i * H entries, each group into
2^(i+1) half-blocks of r = H / 2 entries, and put the even half-blocks first, then the odd ones:

    group  [h0 h1 h2 h3 ... ]  ->  [h0 h2 ... | h1 h3 ...]      P_0 = I (one even, one odd half-block)

so a block of factor i mixes half-blocks 2^i apart, and N factors mix blocks across 2^(N-1) * H
entries. On a row vector x, `P_i^T` is that reordering -- a reshape to (groups, 2^i, 2, r) and a
transpose of the middle two axes -- and `P_i` its inverse; no permutation matrix or index table:

    x B_i   = shuffle_i( blocks_i( unshuffle_i(x) ) )         (n * H multiply-adds per row)
    x R     = x B_(N-1) ... B_0           x R^T = x B_0^T ... B_(N-1)^T

Everything BOFT does is one of those two products (`butterfly_rows`); R itself, n x n, is only formed
for peft's `get_delta_weight` API (`dense_rotation`).

Multiplicative dropout (`MultiplicativeDropoutLayer`, training only): in one randomly chosen factor,
a fraction p of its D rotations is replaced by the identity.
"""

from __future__ import annotations

import torch
from torch import nn


def cayley_blocks(params: torch.Tensor) -> torch.Tensor:
    """(..., H, H) unconstrained blocks -> their Cayley rotations (I - S)(I + S)^-1, in `params`' dtype.

    The b x b solves run in float32 at least (no half-precision kernels for `linalg.solve`).
    """
    work = params if params.dtype in (torch.float32, torch.float64) else params.float()
    skew = 0.5 * (work - work.transpose(-2, -1))
    identity = torch.eye(work.shape[-1], device=work.device, dtype=work.dtype).expand_as(skew)
    # X (I + S) = I - S  ->  X = (I - S)(I + S)^-1
    return torch.linalg.solve(identity + skew, identity - skew, left=False).to(params.dtype)


def _shuffle(x: torch.Tensor, level: int, half_block: int, inverse: bool) -> torch.Tensor:
    """x P_level^T (even half-blocks of each group first) or, with `inverse`, x P_level; last axis only."""
    lead, n = x.shape[:-1], x.shape[-1]
    spread = 2**level
    groups = n // (2 * spread * half_block)
    if inverse:
        view = x.reshape(*lead, groups, 2, spread, half_block)
    else:
        view = x.reshape(*lead, groups, spread, 2, half_block)
    return view.transpose(-3, -2).reshape(*lead, n)


def butterfly_permutation(n: int, block_size: int, level: int) -> torch.Tensor:
    """The index form of P_level: `(P x)[k] = x[perm[k]]` (peft's `block_butterfly_perm` for factor `level`)."""
    indices = torch.arange(n)
    if level == 0:
        return indices
    return _shuffle(indices.unsqueeze(0), level, block_size // 2, inverse=False)[0]


def _blocks_times(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x diag(blocks) for rows x (..., D * H), blocks (D, H, H)."""
    num_blocks, block_size = blocks.shape[0], blocks.shape[-1]
    split = x.reshape(*x.shape[:-1], num_blocks, block_size)
    return torch.einsum("...dh,dhk->...dk", split, blocks).reshape(x.shape)


def butterfly_rows(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """`x R` (or `x R^T`) for the rows of x (..., n), with R built from `rotations` (N, D, H, H) as above."""
    factors, block_size = rotations.shape[0], rotations.shape[-1]
    half_block = block_size // 2
    levels = range(factors) if transpose else reversed(range(factors))
    for level in levels:
        blocks = rotations[level].transpose(-2, -1) if transpose else rotations[level]
        if level == 0:
            x = _blocks_times(x, blocks)
        else:
            x = _shuffle(_blocks_times(_shuffle(x, level, half_block, inverse=True), blocks), level, half_block, False)
    return x


def dense_rotation(rotations: torch.Tensor) -> torch.Tensor:
    """The n x n matrix R of `rotations` (N, D, H, H): `I R`."""
    n = rotations.shape[1] * rotations.shape[-1]
    identity = torch.eye(n, device=rotations.device, dtype=rotations.dtype)
    return butterfly_rows(identity, rotations)


class MultiplicativeDropoutLayer(nn.Module):
    """peft's BOFT dropout: in training, `int(p * D)` random blocks of one random factor become I."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, rotations: torch.Tensor) -> torch.Tensor:
        """rotations (N, D, H, H) -> the same with some blocks replaced by the identity (training only)."""
        if not self.training:
            return rotations
        if rotations.shape[-1] != rotations.shape[-2]:
            raise ValueError("The last two dimensions of input should be the same!")
        factors, num_blocks, block_size, _ = rotations.shape
        dropped = int(self.p * num_blocks)
        if dropped == 0:
            return rotations
        factor = int(torch.randint(0, factors, (1,)).item())
        chosen = torch.randperm(num_blocks, device=rotations.device)[:dropped]
        mask = torch.zeros(factors, num_blocks, 1, 1, device=rotations.device, dtype=rotations.dtype)
        mask[factor, chosen] = 1
        identity = torch.eye(block_size, device=rotations.device, dtype=rotations.dtype)
        return (1 - mask) * rotations + mask * identity

    def extra_repr(self) -> str:
        return f"p={self.p}"
