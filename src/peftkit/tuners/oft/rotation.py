r"""OFT's block-diagonal rotation, built from skew-symmetric parameters and applied block by block.

A layer's input dimension d (for Conv2d, d = in_channels * kh * kw: one receptive field) is cut
into n blocks of size b (n * b = d). Each block i has b(b-1)/2 parameters q_i, the strict upper
triangle of a skew-symmetric Q_i = U_i - U_i^T, and a rotation

    R_i = (I - Q_i)(I + Q_i)^-1                          exact Cayley (a b x b solve), or
    R_i = I + 2 Q + 2 Q^2 + ... + 2 Q^(t-2) + Q^(t-1)    peft's t-term Neumann form (t = num_cayley_neumann_terms)

    R = diag(R_1, ..., R_n)          d x d, never formed: each use is a batched b x b product

    block_share: one q for all blocks (R_i = R_1).   coft: before each use every Q_i is scaled back
    to ||Q_i||_F <= eps / sqrt(number of stored blocks) (the parameters are updated in place, as peft).

`rotate_rows(X, blocks)` computes X R for the rows of any X (..., d): view X as (..., n, b) and
multiply each block by its R_i -- d * b multiply-adds per row instead of d * d (and no d x d
matrix in memory). Everything OFT does is one such product:

    Linear input     x -> x R                      (before the frozen base layer; y = W R^T x)
    merge Linear     W -> W R^T = rotate_rows(W, R_i^T)
    merge / forward  Conv2d: the same on W viewed as (out, in_channels * kh * kw)
    Embedding        E -> E R (the looked-up rows; merging rotates the table)
    unmerge          the same with R_i^-1 (batched b x b inverses; the Neumann form is only
                     approximately orthogonal, so R^T would not undo it)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def skew_symmetric(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, b(b-1)/2) upper-triangle entries (row-major, as peft) -> (n, b, b) skew-symmetric Q = U - U^T."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = torch.zeros(vec.shape[0], block_size, block_size, device=vec.device, dtype=vec.dtype)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def upper_entries(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of `skew_symmetric`: (n, b, b) -> (n, b(b-1)/2)."""
    block_size = matrix.shape[-1]
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=matrix.device)
    return matrix[:, rows, cols]


def cayley(vec: torch.Tensor, block_size: int, use_neumann: bool = True, num_terms: int = 5) -> torch.Tensor:
    """The (n, b, b) rotation blocks R_i of parameters `vec` (n, b(b-1)/2), in `vec`'s dtype."""
    skew = skew_symmetric(vec, block_size)
    if use_neumann:
        rotation = torch.eye(block_size, device=vec.device, dtype=vec.dtype).repeat(skew.shape[0], 1, 1)
        if num_terms > 1:
            rotation.add_(skew, alpha=2.0)
        if num_terms > 2:
            power = torch.bmm(skew, skew)
            rotation.add_(power, alpha=2.0)
            for _ in range(3, num_terms - 1):
                power = torch.bmm(power, skew)
                rotation.add_(power, alpha=2.0)
            rotation.add_(torch.bmm(power, skew))  # the last term has coefficient 1
        return rotation
    # linalg.solve has no half-precision kernels: solve in float32 there.
    work = skew if skew.dtype in (torch.float32, torch.float64) else skew.float()
    identity = torch.eye(block_size, device=vec.device, dtype=work.dtype).expand_as(work)
    # X (I + Q) = I - Q  ->  X = (I - Q)(I + Q)^-1
    return torch.linalg.solve(identity + work, identity - work, left=False).to(vec.dtype)


def project_coft(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: each block's Q scaled back onto the ball ||Q||_F <= eps / sqrt(n) (n = vec.shape[0])."""
    skew = skew_symmetric(vec, block_size)
    radius = eps / math.sqrt(skew.shape[0])
    norm = torch.linalg.matrix_norm(skew, keepdim=True)
    inside = norm <= radius
    projected = torch.where(inside, skew, radius * (skew / torch.where(inside, torch.ones_like(norm), norm)))
    return upper_entries(projected)


def rotate_rows(x: torch.Tensor, blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`x R` for R = diag(blocks) (a single block repeated `num_blocks` times when blocks is (1, b, b)).

    x: (..., num_blocks * b); blocks: (num_blocks, b, b) or (1, b, b). d * b multiply-adds per row.
    """
    block_size = blocks.shape[-1]
    split = x.reshape(*x.shape[:-1], num_blocks, block_size)
    if blocks.shape[0] == 1:  # block_share: one (b, b) matmul over every block of every row
        rotated = torch.matmul(split, blocks[0])
    else:
        rotated = torch.einsum("...nk,nkc->...nc", split, blocks)
    return rotated.reshape(x.shape)


class OFTRotationModule(nn.Module):
    """The parameters of one adapter on one layer (`weight`, saved as `...oft_R.weight`) and their rotation.

    `weight` is (stored blocks, b(b-1)/2): `r` blocks, or one with `block_share`. `in_features` is
    the rotated dimension d; `num_blocks = d / b` blocks are applied.
    """

    def __init__(
        self,
        r: int,
        n_elements: int,
        block_size: int,
        in_features: int,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        kernel_size: tuple[int, ...] = (0, 0),
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
    ) -> None:
        super().__init__()
        self.r = r
        self.n_elements = n_elements
        self.block_size = block_size
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(r, n_elements))
        self.coft = coft
        self.eps = eps
        self.block_share = block_share
        self.kernel_size = kernel_size
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms

    @property
    def num_blocks(self) -> int:
        return self.in_features // self.block_size

    def rotation_blocks(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (stored blocks, b, b) rotations R_i; with `coft`, `weight` is projected first (in place).

        `dtype` computes from a copy of the parameters in that dtype (merging over CPU half precision).
        """
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(project_coft(self.weight, self.block_size, self.eps))
        weight = self.weight if dtype is None else self.weight.to(dtype)
        return cayley(weight, self.block_size, self.use_cayley_neumann, self.num_cayley_neumann_terms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x R` over the last dimension of x (computed in the parameters' dtype, returned in x's)."""
        blocks = self.rotation_blocks()
        return rotate_rows(x.to(blocks.dtype), blocks, self.num_blocks).to(x.dtype)

    def get_weight(self) -> torch.Tensor:
        """The dense d x d block-diagonal R (peft's API; peftkit's own code never forms it)."""
        blocks = self.rotation_blocks()
        if blocks.shape[0] == 1:
            blocks = blocks.expand(self.num_blocks, -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    def extra_repr(self) -> str:
        shared = ", block_share=True" if self.block_share else ""
        return f"blocks={self.num_blocks}, block_size={self.block_size}{shared}"
