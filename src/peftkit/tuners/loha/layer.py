r"""LoHa layers: the update is the Hadamard (element-wise) product of two low-rank matrices.

    delta_W = (W1a W1b) * (W2a W2b) * alpha / r        W1a, W2a: out x r    W1b, W2b: r x in

With `init_weights=True`, W2b starts at zero (the other factors Kaiming-uniform), so a new adapter
is a no-op. For convolutions, `in` is `in_channels / groups * prod(kernel)`; with
`use_effective_conv2d` the kernel gets a CP factorisation instead:

    R_n[o, i, k] = sum_ab t_n[a, b, k] Wna[a, o] Wnb[b, i]        delta_W = R_1 * R_2 * alpha / r

Factored forward. Writing the Hadamard product of two rank-r products as one rank-r^2 product,

    delta_W = A B,   A[o, (p, q)] = W1a[o, p] W2a[o, q],   B[(p, q), i] = W1b[p, i] W2b[q, i]

so `delta(x) = (x B^T) A^T`: r^2 (in + out) multiply-adds per row instead of in * out (plus
building delta_W). For convolutions B is an r^2-channel conv with the base kernel and A a 1x1
conv; in the CP form the kernel sits in an r^2 -> r^2 core conv between two 1x1 convs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._lycoris import LycorisLayer, conv_fn, cp_rebuild, kaiming_


def _row_products(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """All products of a row of `left` with a row of `right`: (p, n), (q, n) -> (p * q, n)."""
    return (left.unsqueeze(1) * right.unsqueeze(0)).reshape(left.shape[0] * right.shape[0], -1)


def _effective(
    weight: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, scale: Any, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`W + scale * p1 * p2`; `scale` a number or an (out, 1) column; `out=p1` reuses p1's memory."""
    if isinstance(scale, torch.Tensor):
        return torch.addcmul(weight, p1 * scale, p2, out=out)
    return torch.addcmul(weight, p1, p2, value=scale, out=out)


def _pair_grads(
    wa: torch.Tensor, wb: torch.Tensor, grad_p: torch.Tensor, scale: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dWa, dWb) of `scale * P`, P = Wa Wb, given `grad_p` = dL/d(scale * P) * P's partner: the
    scale (a number or an (out, 1) column) is applied to the rank-r results, not to an (out, in) one."""
    if isinstance(scale, torch.Tensor):
        return (grad_p @ wb.T) * scale, (wa * scale).T @ grad_p
    return (grad_p @ wb.T).mul_(scale), (wa.T @ grad_p).mul_(scale)


class LoHaLayer(LycorisLayer):
    """LoHa on `nn.Linear`, transformers' `Conv1D`, `nn.Conv1d` or `nn.Conv2d`."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    always_scale_rank_dropout = True
    method_name = "loha"
    display_name = "LoHa"

    def _create_adapter(self, adapter_name: str, r: int, init_weights: Any, use_effective_conv2d: bool = False) -> None:
        out_features, in_per_group, *kernel = self.weight_shape
        if self._wants_effective_conv(use_effective_conv2d):
            # The core is 4-d even for Conv1d ((r, r, k, 1)), the layout peft saves.
            core_shape = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            self.hada_t1[adapter_name] = nn.Parameter(torch.empty(core_shape))
            self.hada_t2[adapter_name] = nn.Parameter(torch.empty(core_shape))
            out_shape, in_shape = (r, out_features), (r, in_per_group)
        else:
            out_shape, in_shape = (out_features, r), (r, in_per_group * math.prod(kernel))
        for name in ("hada_w1_a", "hada_w2_a"):
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(out_shape))
        for name in ("hada_w1_b", "hada_w2_b"):
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(in_shape))
        self.reset_adapter_parameters(adapter_name, init_weights)

    def reset_adapter_parameters(self, adapter_name: str, init_weights: Any = True) -> None:
        """Kaiming-uniform everywhere; with `init_weights=True`, W2b zero so delta_W starts at 0."""
        for name in self.adapter_layer_names:
            if adapter_name in getattr(self, name):
                kaiming_(getattr(self, name)[adapter_name])
        if init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])

    # ------------------------------------------------------------------ materialised
    def _delta_kernel(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if adapter_name in self.hada_t1:
            delta = cp_rebuild(self.hada_t1[adapter_name], w1a, w1b) * cp_rebuild(self.hada_t2[adapter_name], w2a, w2b)
        else:
            delta = (w1a @ w1b) * (w2a @ w2b)
        return (delta * self.scaling[adapter_name]).reshape(self.weight_shape)

    # ------------------------------------------------------------------ fused (see _lycoris)
    def _linear_factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name)[adapter_name] for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))

    def _row_scale(self, adapter_name: str, row_scale: Optional[torch.Tensor]) -> Any:
        scaling = self.scaling[adapter_name]
        return scaling if row_scale is None else row_scale * scaling

    def fused_effective_weight(
        self, adapter_name: str, weight: torch.Tensor, row_scale: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """`W + s (W1a W1b) * (W2a W2b)` in one addcmul, written over the first product."""
        with torch.no_grad():
            w1a, w1b, w2a, w2b = self._linear_factors(adapter_name)
            p1 = w1a @ w1b
            return _effective(weight, p1, w2a @ w2b, self._row_scale(adapter_name, row_scale), out=p1)

    def fused_backward(
        self, adapter_name: str, weight: torch.Tensor, row_scale: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], list[Optional[torch.Tensor]]]]:
        r"""Closed form: with `P1 = W1a W1b`, `P2 = W2a W2b` and G = dL/d delta_W,
        `dP1 = s G * P2`, `dP2 = s G * P1`, then `dW1a = dP1 W1b^T`, `dW1b = W1a^T dP1` (likewise
        for W2). The products are written over P2 and P1 (each is done with by then) and s is
        applied to the rank-r results, so backward allocates no (out, in) tensor beyond P1, P2 and
        `W + delta_W`."""
        w1a, w1b, w2a, w2b = self._linear_factors(adapter_name)
        scale = self._row_scale(adapter_name, row_scale)
        with torch.no_grad():
            p1, p2 = w1a @ w1b, w2a @ w2b
            effective = _effective(weight, p1, p2, scale)

        def factor_grads(grad_delta: torch.Tensor) -> list[Optional[torch.Tensor]]:
            with torch.no_grad():
                grad_p1, grad_p2 = p2.mul_(grad_delta), p1.mul_(grad_delta)
                return [*_pair_grads(w1a, w1b, grad_p1, scale), *_pair_grads(w2a, w2b, grad_p2, scale)]

        return effective, factor_grads

    # ------------------------------------------------------------------ factored
    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(A: out x r^2, B: r^2 x in_flat, core: r^2 x r^2 x kernel or None) with delta_W = A core B."""
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if adapter_name not in self.hada_t1:
            return _row_products(w1a.T, w2a.T).T, _row_products(w1b, w2b), None
        t1, t2 = self.hada_t1[adapter_name], self.hada_t2[adapter_name]
        r1, r2 = t1.shape[0], t2.shape[0]
        # core[(a, c), (b, d), k...] = t1[a, b, k...] * t2[c, d, k...]
        core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r1 * r2, r1 * r2, *t1.shape[2:])
        return _row_products(w1a, w2a).T, _row_products(w1b, w2b), core

    def _factored_output(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        if self.is_conv and self.get_base_layer().groups != 1:
            return None
        outer, inner, core = self._factors(adapter_name)
        scaling = self.scaling[adapter_name]
        if not self.is_conv:
            return (x @ inner.T) @ (outer.T * scaling)
        base, conv = self.get_base_layer(), conv_fn(self)
        kernel_dims = len(self.kernel_size)
        geometry = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        pointwise = (1,) * kernel_dims
        if core is None:
            hidden = conv(x, inner.reshape(inner.shape[0], *self.weight_shape[1:]), **geometry)
        else:
            hidden = conv(x, inner.reshape(*inner.shape, *pointwise))
            hidden = conv(hidden, core.reshape(*core.shape[:2], *self.kernel_size), **geometry)
        return conv(hidden, (outer * scaling).reshape(*outer.shape, *pointwise))

    def _build_cost(self, adapter_name: str) -> float:
        r = self.r[adapter_name]
        out_features, in_per_group, *kernel = self.weight_shape
        taps = math.prod(kernel)
        if adapter_name in self.hada_t1:
            return 2 * r * taps * in_per_group * (r + out_features) + out_features * in_per_group * taps
        return out_features * in_per_group * taps * (2 * r + 1)

    def _factored_cost(self, adapter_name: str, positions: int) -> float:
        if self.is_conv and self.get_base_layer().groups != 1:
            return math.inf
        r = self.r[adapter_name]
        out_features, in_per_group, *kernel = self.weight_shape
        taps = math.prod(kernel)
        if adapter_name in self.hada_t1:
            return (positions + 1) * (r**4 * taps + r * r * (in_per_group + out_features))
        return (positions + 1) * r * r * (in_per_group * taps + out_features)
