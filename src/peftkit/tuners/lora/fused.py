r"""A LoRA Linear layer (or its low-rank term alone) as one autograd function, and a cheaper dropout mask.

    y = W x + b + s * B A dropout(x) = W x + b + (s / q) * B A (x * keep),   keep ~ Bernoulli(q), q = 1 - p

Why a function of its own: the plain module path (`nn.Dropout`, `lora_A`, `lora_B`, `* s`) costs,
per step and layer, one Bernoulli draw per input element (on CPU slower than the base layer's
matmul), a float pass over the input to apply it, and an output-sized multiply and add forward
and backward. Here

- on CPU the mask is drawn as the *positions* to drop (`dropped_positions`): exact Bernoulli(p)
  per element at ~5 % of the random numbers, and backward keeps those positions, not a mask;
  elsewhere (or under `torch.compile`) as random int16 words compared with a threshold (four words
  per 64-bit draw, so `p` is rounded to a multiple of 1/65536 and the kept values are scaled by
  the matching 1/q);
- the scaling (and 1/q) multiplies the rank-r hidden state, not the output;
- backward keeps the input A saw (x itself without dropout; with dropout the dropped copy, which
  dA needs: cheaper kept than redrawn, and on this workload +6 MB a decoder layer), the drop
  (positions or bool mask, to zero the input gradient) and the (tokens, r) hidden state;
- with the base layer inside the same function, the low-rank product is accumulated into the base
  output (`addmm_`) and the low-rank input gradient into the base one, so neither sum costs an
  output- or input-sized add of its own.

Gradients equal those of the composed ops `F.linear(x, W, b) + F.linear(F.linear(x * keep, A) * s / q, B)` (see
tests/test_lora_fast_path.py). Under `torch.compile` the word mask is drawn the same way (traced
without a graph break): inductor's own `rand_like` on CPU measured ~7x slower (5.6 vs 0.8 ms for
0.5 M entries, torch 2.13).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

_WORD_LEVELS = 65536  # int16 words: p is rounded to a multiple of 1 / 65536
# Up to this rate drawing the dropped positions beats drawing a word per element (measured on CPU,
# torch 2.13: at p = 0.2 the two cost about the same per layer, at 0.05 positions are ~4x cheaper).
_POSITIONS_MAX_P = 0.2


def drop_threshold(p: float) -> int:
    """How many of the 65536 int16 values mean "drop"; 0 < result < 65536 for usable rates."""
    return round(p * _WORD_LEVELS)


def fast_mask_supported(p: float) -> bool:
    """Whether `p` survives the rounding to 1/65536 as a real dropout (neither 0 nor 1)."""
    return 0 < drop_threshold(p) < _WORD_LEVELS


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(bool mask shaped like `x`, keep probability q it was drawn with)."""
    threshold = drop_threshold(p)
    numel = x.numel()
    # randint, not random_: the same speed eagerly, and traced by torch.compile without a graph break.
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[:numel].view(x.shape) >= threshold - _WORD_LEVELS // 2
    return keep, 1.0 - threshold / _WORD_LEVELS


def dropped_positions(x: torch.Tensor, p: float) -> torch.Tensor:
    """Flat positions of `x` to drop, each element independently with probability exactly `p`.

    Poisson splitting: M ~ Poisson(lambda) uniform draws over the N positions hit each position a
    Poisson(lambda / N) number of times, independently; a position is dropped when hit at least
    once, i.e. with probability 1 - exp(-lambda / N) = p for lambda = -N ln(1 - p). That is ~0.05 N
    random numbers for p = 0.05 instead of one per element, and backward keeps ~0.05 N positions
    instead of an N-element mask. Duplicate positions are harmless.
    """
    numel = x.numel()
    rate = torch.tensor(-numel * math.log1p(-p), dtype=torch.float64)
    hits = int(torch.poisson(rate).item())
    return torch.randint(0, numel, (hits,), device=x.device)


def draw_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(drop, q): what to drop from `x` at rate `p` and the keep probability q it was drawn with.

    `drop` is a 1-D int64 tensor of flat positions (`dropped_positions`, CPU eager, p <= 0.2) or a
    bool keep mask shaped like `x` (`keep_mask`: other devices, higher rates and under
    `torch.compile`, where a data-dependent size would break the graph).
    """
    if x.device.type == "cpu" and p <= _POSITIONS_MAX_P and not torch.compiler.is_compiling():
        return dropped_positions(x, p), 1.0 - p
    return keep_mask(x, p)


def keep_of(drop: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool keep mask (shaped like `like`) that `drop` of `draw_dropout` stands for."""
    if drop.dtype == torch.bool:
        return drop
    keep = torch.ones(like.numel(), dtype=torch.bool, device=like.device)
    return keep.index_fill_(0, drop, False).view(like.shape)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x * keep / q` with the mask of `draw_dropout`: nn.Dropout's maths at a fraction of its cost on CPU."""
    drop, keep_probability = draw_dropout(x, p)
    if drop.dtype == torch.bool:
        return x * _as_factor(drop, x) * (1.0 / keep_probability)
    flat = x.reshape(-1) * (1.0 / keep_probability)  # a new tensor: the fill below is not on a view
    return flat.index_fill_(0, drop, 0.0).view(x.shape)


class LoraLinearFunction(torch.autograd.Function):
    r"""`x W^T + b + scale * dropout(x) A^T B^T` as one autograd node; `weight` None gives the delta only.

    One node instead of a base matmul, a low-rank branch and an add saves, per layer and step, the
    output-sized add forward (the low-rank product is accumulated into the base output by
    `addmm_`) and the input-sized add of the two input gradients backward (likewise). `drop` comes
    from `draw_dropout` (None: no dropout). `weight` is (out, in); a frozen weight gets no gradient work.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
        weight_a: torch.Tensor, weight_b: torch.Tensor, scale: float, drop: Optional[torch.Tensor],
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        dropped = _dropped(rows, drop)
        hidden = torch.mm(dropped, weight_a.t()).mul_(scale)
        if weight is None:
            out = torch.mm(hidden, weight_b.t())
        else:
            out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
            out.addmm_(hidden, weight_b.t())
        ctx.scale, ctx.x_shape = scale, x.shape
        # dA needs the dropped input: keep it rather than redraw it (x itself only for a trainable W).
        rows_for_weight = rows if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(dropped, rows_for_weight, drop, weight, weight_a, weight_b, hidden)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        dropped, rows, drop, weight, weight_a, weight_b, hidden = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        if needs_b:
            grad_b = grad_rows.t().mm(hidden)
        if needs_x or needs_a:
            grad_hidden = grad_rows.mm(weight_b).mul_(ctx.scale)  # (tokens, r)
            if needs_a:
                grad_a = grad_hidden.t().mm(dropped)
            if needs_x:
                grad_input = grad_hidden.mm(weight_a)
                if drop is not None:
                    _zero_dropped_(grad_input, drop)
                if weight is not None:
                    grad_input.addmm_(grad_rows, weight)
                grad_x = grad_input.view(ctx.x_shape)
        if needs_weight:
            grad_weight = grad_rows.t().mm(rows)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


def _dropped(rows: torch.Tensor, drop: Optional[torch.Tensor]) -> torch.Tensor:
    """`rows` with the dropped entries zeroed (a new tensor; `rows` itself is left alone)."""
    if drop is None:
        return rows
    if drop.dtype == torch.bool:
        return rows * _as_factor(drop, rows)
    out = rows.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, drop, 0.0)
    return out


def _zero_dropped_(grad: torch.Tensor, drop: torch.Tensor) -> None:
    """Zero, in place, the dropped entries of a contiguous tensor shaped like the input."""
    if drop.dtype == torch.bool:
        grad.mul_(_as_factor(drop, grad))
    else:
        grad.view(-1).index_fill_(0, drop, 0.0)


def _as_factor(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask as 0/1 bytes shaped like `like`: float * uint8 runs vectorised, float * bool
    (out of place) takes a slow casting loop on CPU (~20x slower, measured in torch 2.13)."""
    return keep.view(torch.uint8).reshape(like.shape)


def lora_linear(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], weight_a: torch.Tensor,
    weight_b: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
) -> torch.Tensor:
    """`x W^T + b + scaling * B A dropout(x)` (no base term when `weight` is None); dropout only when
    `training` and p > 0."""
    drop = None
    scale = scaling
    if training and dropout_p > 0:
        drop, keep_probability = draw_dropout(x, dropout_p)
        scale = scaling / keep_probability
    return LoraLinearFunction.apply(x, weight, bias, weight_a, weight_b, scale, drop)


def low_rank_delta(
    x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, dropout_p: float, training: bool
) -> torch.Tensor:
    """`scaling * B A dropout(x)` alone (the base output is computed elsewhere)."""
    return lora_linear(x, None, None, weight_a, weight_b, scaling, dropout_p, training)
