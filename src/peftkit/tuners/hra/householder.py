r"""Products of Householder reflections in compact form, never built as dense d x d matrices.

An HRA adapter holds `U` (d x r). Its orthogonal matrix H is one of

    chain (apply_GS=False):  H = H_1 H_2 ... H_r,   H_i = I - 2 v_i v_i^T,   v_i = U[:, i] / ||U[:, i]||
    Gram-Schmidt (True):     H = I - 2 Q Q^T,        Q = the orthonormalised columns of U

Both are written `H = I - V T V^T` (V: d x k, T: k x k), the "compact WY" form of a product of
reflections. For the chain, V holds the normalised columns and T is upper triangular:

    T^-1 = I / 2 + striu(V^T V)          (striu: the part strictly above the diagonal)

which one k x k triangular solve gives; for Gram-Schmidt, V = Q and T = 2 I (H is symmetric).
Then, for rows x (tokens, or rows of a weight),

    x H   = x - ((x V) T) V^T            x H^T = x - ((x V) T^T) V^T        (H^-1 = H^T)

costs 2 d k + k^2 multiply-adds per row, against d^2 for a dense H (and d^2 r to build it by
multiplying the r reflections, as a loop over them does).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reflections are formed in float32 at least (QR and triangular solves need it)."""
    return torch.promote_types(dtype, torch.float32)


def compact_factors(hra_u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, T) with `H = I - V T V^T` for the columns of `hra_u` (d x r), in `compute_dtype`."""
    u = hra_u.to(compute_dtype(hra_u.dtype))
    if apply_gs:
        # Householder QR spans the same nested subspaces as Gram-Schmidt; Q Q^T ignores column signs.
        q = torch.linalg.qr(u, mode="reduced").Q
        return q, 2 * torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    v = u / u.norm(dim=0)
    rank = v.shape[1]
    eye = torch.eye(rank, dtype=v.dtype, device=v.device)
    t_inverse = eye / 2 + torch.triu(v.T @ v, diagonal=1)
    return v, torch.linalg.solve_triangular(t_inverse, eye, upper=True)


def reflect_rows(rows: torch.Tensor, v: torch.Tensor, t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """`rows H` (or `rows H^T` with `transpose`), H = I - V T V^T, for rows of any leading shape."""
    coefficients = (rows @ v) @ (t.T if transpose else t)
    return rows - coefficients @ v.T


def dense(v: torch.Tensor, t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """H (or H^T) as a d x d matrix (peft's `get_delta_weight`; merging and forward never need it)."""
    eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return reflect_rows(eye, v, t, transpose)
