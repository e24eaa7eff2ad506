r"""An (IA)^3 Linear layer as one autograd function, with the vector folded into the weight.

    attention-type:  y = l * (x W^T + b) = x (diag(l) W)^T + l * b
    feed-forward:    y = (l * x) W^T + b = x (W diag(l))^T + b

The module path multiplies a (tokens, features) activation by l forward and again backward, and
multiplies it by the gradient for l's own gradient: three activation-sized passes per layer. Here
l scales the (out, in) weight instead (fewer values than the activation whenever
tokens > in or out), the input gradient reuses that scaled weight, and l's gradient is read off
tensors the step has anyway:

    attention-type:  dl = sum_tokens(g * y) / l        (y = l * z, so g * z = g * y / l)
    feed-forward:    dl = sum_tokens(dx * x) / l       (dx = (g W) * l is the input gradient)

Dividing by l needs every |l| well above zero; `can_fold` says when, and the layer keeps the module
path otherwise (and on accelerators, where that check would synchronise).
"""

from __future__ import annotations

from typing import Optional

import torch


def can_fold(vector: torch.Tensor) -> bool:
    """Whether every entry of `vector` is safe to divide by (|l| >= sqrt of the dtype's smallest normal)."""
    return bool(vector.abs().min() >= torch.finfo(vector.dtype).tiny ** 0.5)


def _weight_factor(vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """l shaped to scale the (out, in) weight's columns (feed-forward) or rows (attention-type)."""
    return vector.view(1, -1) if feedforward else vector.view(-1, 1)


class IA3LinearFunction(torch.autograd.Function):
    """`x (W * l)^T + b'` for a (out, in) weight; `feedforward` picks l's axis (in) or (out)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], vector: torch.Tensor,
        feedforward: bool,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scaled = weight * _weight_factor(vector, feedforward)
        if bias is not None and not feedforward:
            bias = bias * vector.view(-1)
        out = torch.mm(rows, scaled.t()) if bias is None else torch.addmm(bias, rows, scaled.t())
        ctx.feedforward, ctx.x_shape = feedforward, x.shape
        # feed-forward: l's gradient needs x; attention-type: it needs y, the output itself.
        ctx.save_for_backward(rows if feedforward or ctx.needs_input_grad[1] else None,
                              None if feedforward else out, scaled, vector)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        rows, out, scaled, vector = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_vector = ctx.needs_input_grad[:4]
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_weight = grad_bias = grad_vector = None
        grad_input = grad_rows.mm(scaled) if needs_x or (needs_vector and ctx.feedforward) else None
        if needs_vector:
            along = (grad_input * rows) if ctx.feedforward else (grad_rows * out)
            grad_vector = along.sum(0).div_(vector.view(-1)).view(vector.shape)
        if needs_x:
            grad_x = grad_input.view(ctx.x_shape)
        if needs_weight:
            grad_weight = grad_rows.t().mm(rows).mul_(_weight_factor(vector, ctx.feedforward))
        if needs_bias:
            grad_bias = grad_rows.sum(0) if ctx.feedforward else grad_rows.sum(0) * vector.view(-1)
        return grad_x, grad_weight, grad_bias, grad_vector, None
