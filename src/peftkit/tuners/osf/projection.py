r"""OSF's gradient projection: the trained singular vectors only move orthogonally to the frozen ones.

With `W = U S V^T` split at `k = effective_rank` into a frozen high part (U_high: out x k,
V_high: k x in) and a trained low part (U_low, S_low, V_low), the gradients of U_low and V_low are

    dU <- (I - U_high U_high^T) dU        dV <- dV (I - V_high^T V_high)

When U is square (out <= in), `I - U_high U_high^T = U_low0 U_low0^T` with U_low0 the initial low
vectors, so the projection uses the smaller U_low0 instead (likewise V when out >= in): peft's rule,
and the reason only the non-square factor's high part is kept.

peft applies this with tensor hooks on the parameters. Here it is an autograd identity wrapped
around each use of U_low / V_low (`project_rows` / `project_columns`), which gives the same
gradients for everything computed through the layer and survives the parameters being replaced
(dtype casts, loading onto meta tensors, FSDP).
"""

from __future__ import annotations

from typing import Any

import torch


class _ProjectRows(torch.autograd.Function):
    """Identity forward; backward `grad -> basis basis^T grad` (keep) or `grad - basis basis^T grad` (remove)."""

    @staticmethod
    def forward(ctx: Any, factor: torch.Tensor, basis: torch.Tensor, keep: bool) -> torch.Tensor:
        ctx.save_for_backward(basis)
        ctx.keep = keep
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (basis,) = ctx.saved_tensors
        basis = basis.to(grad.dtype)
        inside = basis @ (basis.transpose(0, 1) @ grad)
        return (inside if ctx.keep else grad - inside), None, None


class _ProjectColumns(torch.autograd.Function):
    """Identity forward; backward `grad -> grad basis^T basis` (keep) or `grad - grad basis^T basis` (remove)."""

    @staticmethod
    def forward(ctx: Any, factor: torch.Tensor, basis: torch.Tensor, keep: bool) -> torch.Tensor:
        ctx.save_for_backward(basis)
        ctx.keep = keep
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (basis,) = ctx.saved_tensors
        basis = basis.to(grad.dtype)
        inside = (grad @ basis.transpose(0, 1)) @ basis
        return (inside if ctx.keep else grad - inside), None, None


def project_rows(factor: torch.Tensor, basis: torch.Tensor, keep: bool) -> torch.Tensor:
    """`factor` (out x r) as is, its gradient projected onto span(basis) (keep) or its complement."""
    if not factor.requires_grad:
        return factor
    return _ProjectRows.apply(factor, basis, keep)


def project_columns(factor: torch.Tensor, basis: torch.Tensor, keep: bool) -> torch.Tensor:
    """`factor` (r x in) as is, its gradient's rows projected onto span(basis rows) (keep) or its complement."""
    if not factor.requires_grad:
        return factor
    return _ProjectColumns.apply(factor, basis, keep)
