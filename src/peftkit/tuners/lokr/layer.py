r"""LoKr layers: the update is a scaled Kronecker product of a small and a (low-rank) larger matrix.

    out = a * b, in = c * d                      (split by `factorization`)
    delta_W = kron(W1, W2) * alpha / r           W1: a x c     W2: b x d  (b x d x kernel for convs)
    delta_W[i*b + j, k*d + l] = W1[i, k] * W2[j, l]

W1 is stored whole (`lokr_w1`) or, with `decompose_both` and a small r, as `lokr_w1_a @ lokr_w1_b`;
W2 likewise (`lokr_w2` or `lokr_w2_a @ lokr_w2_b`), or CP-factored with a core `lokr_t2` under
`use_effective_conv2d`. With `init_weights=True`, W1 starts at zero, so a new adapter is a no-op.

Factored forward. Viewing a row x (length c*d) as a c x d matrix X, the Kronecker identity gives

    delta(x) = vec(W1 X W2^T) * alpha / r

so each row costs b*c*(d + a) multiply-adds instead of a*b*c*d (and delta_W is never formed). For
a convolution, X's c blocks of d channels each go through W2 as a conv (folded into the batch),
and W1 then mixes the blocks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .._lycoris import LycorisLayer, conv_fn, cp_rebuild, kaiming_
from .kron_linear import KroneckerLinear


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into `m * n` the way LyCORIS (and so peft's checkpoints) do.

    If `factor` divides `dimension`, the result is `(factor, dimension // factor)`. Otherwise the
    divisors m of `dimension` are tried in increasing order, stopping at the first one that exceeds
    `factor` (no limit for -1) or reaches the square root; the pair comes back smaller first.
    E.g. 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127), and with factor 4, 128 -> (4, 32).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, dimension + 1):
        if dimension % candidate:
            continue
        if candidate > limit:
            break
        m = candidate
        if m >= dimension // m:
            break
    n = dimension // m
    return min(m, n), max(m, n)


def kron(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Kronecker product with torch.kron's semantics (the shorter shape is padded with leading 1s).

    Written out with broadcasting: torch.kron fails on some tensors that are contiguous only up to
    size-1 dimensions (as einsum returns for CP-factored kernels).
    """
    dims = max(left.dim(), right.dim())
    left = left.reshape((1,) * (dims - left.dim()) + tuple(left.shape))
    right = right.reshape((1,) * (dims - right.dim()) + tuple(right.shape))
    spread_left = left.reshape([size for dim in left.shape for size in (dim, 1)])
    spread_right = right.reshape([size for dim in right.shape for size in (1, dim)])
    return (spread_left * spread_right).reshape([a * b for a, b in zip(left.shape, right.shape)])


class LoKrLayer(LycorisLayer):
    """LoKr on `nn.Linear`, transformers' `Conv1D`, `nn.Conv1d` or `nn.Conv2d`."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    method_name = "lokr"
    display_name = "LoKr"

    def _create_adapter(
        self,
        adapter_name: str,
        r: int,
        init_weights: Any,
        use_effective_conv2d: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
    ) -> None:
        out_features, in_per_group, *kernel = self.weight_shape
        a, b = factorization(out_features, decompose_factor)
        c, d = factorization(in_per_group, decompose_factor)
        # As LyCORIS: a factor is low-rank only when r is below half its larger side.
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[adapter_name] = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b[adapter_name] = nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1[adapter_name] = nn.Parameter(torch.empty(a, c))
        if r >= max(b, d) / 2:
            self.lokr_w2[adapter_name] = nn.Parameter(torch.empty(b, d, *kernel))
        elif self._wants_effective_conv(use_effective_conv2d):
            core_shape = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            self.lokr_t2[adapter_name] = nn.Parameter(torch.empty(core_shape))
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        self.reset_adapter_parameters(adapter_name, init_weights)

    def reset_adapter_parameters(self, adapter_name: str, init_weights: Any = True) -> None:
        """Kaiming-uniform everywhere, then zero W1 (True) or W2 ("lycoris") so delta_W starts at 0."""
        for name in self.adapter_layer_names:
            if adapter_name in getattr(self, name):
                kaiming_(getattr(self, name)[adapter_name])
        if init_weights == "lycoris":
            nn.init.zeros_((self.lokr_w2 if adapter_name in self.lokr_w2 else self.lokr_w2_b)[adapter_name])
        elif init_weights:
            nn.init.zeros_((self.lokr_w1 if adapter_name in self.lokr_w1 else self.lokr_w1_a)[adapter_name])

    # ------------------------------------------------------------------ factors
    def _w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def _w2(self, adapter_name: str) -> torch.Tensor:
        """W2 as stored: (b, d[, kernel]) whole, (b, d, k, k) from the CP form, (b, d * taps) low-rank."""
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        if adapter_name in self.lokr_t2:
            return cp_rebuild(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def _delta_kernel(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self._w1(adapter_name), self._w2(adapter_name)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # A 3-d W2 (Conv1d, stored whole) meets a 2-d W1 here: kron then pairs their axes from
        # the right. The resulting layout is peft's, so checkpoints keep their meaning.
        return (kron(w1, w2) * self.scaling[adapter_name]).reshape(self.weight_shape)

    # ------------------------------------------------------------------ factored
    def _w2_kernel(self, adapter_name: str) -> Optional[torch.Tensor]:
        """W2 as a (b, d, *kernel) weight, or None where the delta is not a plain Kronecker product."""
        w2 = self._w2(adapter_name)
        if self.is_conv and w2.dim() == 3:
            return None  # see _delta_kernel: that layout has no Kronecker form to exploit
        _, in_per_group, *kernel = self.weight_shape
        return w2.reshape(w2.shape[0], in_per_group // self._w1_shape(adapter_name)[1], *kernel)

    def _w1_shape(self, adapter_name: str) -> tuple[int, int]:
        if adapter_name in self.lokr_w1:
            return tuple(self.lokr_w1[adapter_name].shape)
        return self.lokr_w1_a[adapter_name].shape[0], self.lokr_w1_b[adapter_name].shape[1]

    def _factored_output(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        kernel_dims = len(self.kernel_size)
        if self.is_conv and (self.get_base_layer().groups != 1 or x.dim() != kernel_dims + 2):
            return None
        w2 = self._w2_kernel(adapter_name)
        if w2 is None:
            return None
        w1 = self._w1(adapter_name) * self.scaling[adapter_name]
        if not self.is_conv:
            return KroneckerLinear.apply(x, w1, w2)
        (a, c), b, d = w1.shape, w2.shape[0], w2.shape[1]
        base = self.get_base_layer()
        batch, spatial = x.shape[0], x.shape[2:]
        hidden = conv_fn(self)(
            x.reshape(batch * c, d, *spatial), w2, stride=base.stride, padding=base.padding, dilation=base.dilation
        )
        hidden = hidden.reshape(batch, c, b, *hidden.shape[2:])
        return torch.einsum("ac,ncb...->nab...", w1, hidden).reshape(batch, a * b, *hidden.shape[3:])

    def _build_cost(self, adapter_name: str) -> float:
        return math.prod(self.weight_shape)

    def _factored_cost(self, adapter_name: str, positions: int) -> float:
        if self.is_conv and self.get_base_layer().groups != 1:
            return math.inf
        out_features, in_per_group, *kernel = self.weight_shape
        a, c = self._w1_shape(adapter_name)
        b, d = out_features // a, in_per_group // c
        return positions * b * c * (d * math.prod(kernel) + a)
