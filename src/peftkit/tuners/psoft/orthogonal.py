r"""PSOFT's r x r transformation R, trained between the frozen principal-subspace factors A and B.

    psoft_orth=True    Q = skew(q)  (q: the r(r-1)/2 entries above the diagonal; Q^T = -Q)
                       R0 = (I + Q)(I - Q)^-1                       (Cayley: orthogonal)
                       or, use_cayley_neumann:  R0 = I + 2Q + 2Q^2 + ... (see `neumann_cayley`)
    psoft_orth=False   R0 = the free (r x r) `weight`
    R = diag(b) R0 diag(a)       b = `vector_b` (psoft_mag_b), a = `vector_a` (psoft_mag_a), else 1

Saved as `<module>.psoft_R.weight` (+ `.vector_b`, `.vector_a`). `init_weights=True` starts at
q = 0 (or R0 = I) and a = b = 1, so R = I; False draws q ~ N(0, 0.1^2) (or R0 = I + N(0, 0.1^2)).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def neumann_cayley(q_matrix: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series for (I + Q)(I - Q)^-1 with `terms` terms.

    terms = 1: I;  2: I + 2Q;  t >= 3: I + 2Q + 2Q^2 + 2(Q^3 + ... + Q^(t-2)) + Q^max(3, t-1)
    (so 3 and 4 terms give the same matrix, as in peft 0.21.2).
    """
    eye = torch.eye(q_matrix.shape[0], dtype=q_matrix.dtype, device=q_matrix.device)
    if terms <= 1:
        return eye
    result = eye + 2 * q_matrix
    if terms == 2:
        return result
    power = q_matrix @ q_matrix
    result = result + 2 * power
    for _ in range(3, terms - 1):
        power = power @ q_matrix
        result = result + 2 * power
    return result + power @ q_matrix


class PsoftRotation(nn.Module):
    """R of one adapter (see the module docstring); `forward(x) = x R^T`."""

    def __init__(
        self,
        size: int,
        orth: bool = True,
        mag_b: bool = True,
        mag_a: bool = True,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        cayley_neumann_eps: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.size, self.orth, self.mag_b, self.mag_a = size, orth, mag_b, mag_a
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.cayley_neumann_eps = cayley_neumann_eps
        shape = (size * (size - 1) // 2,) if orth else (size, size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.vector_b = nn.Parameter(torch.empty(size)) if mag_b else None
        self.vector_a = nn.Parameter(torch.empty(size)) if mag_a else None
        if orth:
            rows, cols = torch.triu_indices(size, size, 1)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)

    def reset_parameters(self, init_weights: bool = True) -> None:
        """True: R = I; False: q ~ N(0, 0.1^2) (orth) or R0 = I + N(0, 0.1^2); the scale vectors start at 1."""
        params = [p for p in (self.weight, self.vector_b, self.vector_a) if p is not None]
        if any(p.is_meta for p in params):
            return  # low_cpu_mem_usage: the checkpoint fills them
        with torch.no_grad():
            if self.orth:
                self.weight.zero_() if init_weights else nn.init.normal_(self.weight, mean=0.0, std=0.1)
            else:
                nn.init.eye_(self.weight)
                if not init_weights:
                    self.weight.add_(torch.randn_like(self.weight) * 0.1)
            for vector in params[1:]:
                vector.fill_(1.0)

    def skew(self) -> torch.Tensor:
        """Q: q above the diagonal, -q below."""
        upper = torch.zeros(self.size, self.size, dtype=self.weight.dtype, device=self.weight.device)
        upper = upper.index_put((self.rows, self.cols), self.weight)
        return upper - upper.T

    def get_matrix(self) -> torch.Tensor:
        """R = diag(b) R0 diag(a), in the parameters' dtype."""
        if not self.orth:
            matrix = self.weight
        else:
            q_matrix = self.skew()
            if self.use_cayley_neumann:
                if self.cayley_neumann_eps is not None:
                    norm = torch.linalg.norm(q_matrix, ord="fro")
                    if torch.isfinite(norm) and norm > self.cayley_neumann_eps:
                        q_matrix = q_matrix * (self.cayley_neumann_eps / (norm + 1e-12))
                matrix = neumann_cayley(q_matrix, int(self.num_cayley_neumann_terms))
            else:
                solve_q = q_matrix.float() if q_matrix.dtype in (torch.float16, torch.bfloat16) else q_matrix
                eye = torch.eye(self.size, dtype=solve_q.dtype, device=solve_q.device)
                # X (I - Q) = I + Q  <=>  X = (I + Q)(I - Q)^-1
                matrix = torch.linalg.solve(eye - solve_q, eye + solve_q, left=False)
        if self.vector_b is not None:
            matrix = self.vector_b[:, None] * matrix
        if self.vector_a is not None:
            matrix = matrix * self.vector_a[None, :]
        return matrix.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matrix = self.get_matrix()
        dtype = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return (x.to(dtype) @ matrix.to(dtype).T).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, orth={self.orth}, use_cayley_neumann={self.use_cayley_neumann}, "
            f"num_cayley_neumann_terms={int(self.num_cayley_neumann_terms)}, "
            f"cayley_neumann_eps={self.cayley_neumann_eps}, mag_a={self.mag_a}, mag_b={self.mag_b}"
        )
