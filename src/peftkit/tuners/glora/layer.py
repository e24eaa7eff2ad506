r"""GLoRA layers: one generalized update of a frozen Linear layer's weight *and* bias.

    y = W_eff x + b_eff
    W_eff = W0 + W0 * A + B                   * : element-wise product, broadcast
    b_eff = b0 + b0 * D + E + W0 @ C

Each of A..E is a *path* (saved under `glora_A` ... `glora_E`), chosen by the config:

    path       tensors (checkpoint names)             value                    used for
    "lora"     Xd (rows x r), Xu (r x cols)           Xd @ Xu                  A, B (out x in); C (in x 1)
    "vector"   X  (out x 1), or (in x 1), or (out,)   X                        A, B: per output row; C; D, E
    "constant" X  (1,)                                X[0]                     A, B, D, E
    "none"     zeros (a buffer, saved as peft does)   0                        any

C, D and E are "none" over a base without a bias (there is no b0 to adapt).

Initialisation (`init_weights`, in peft's order and with its draws): True -- Xu Kaiming-uniform,
Xd = 0, X = 0 (a no-op); False -- Xd, Xu and vectors Kaiming-uniform, constants N(0, 0.02^2).

Several active adapters add their updates: `W = W0 + sum_a (W0 * A_a + B_a)` (same for b). The
forward forms the dense update once per call; over a plain `nn.Linear` nothing observes, the base
and the update are one matmul, `y = (W0 + dW) x + (b0 + db)`.

Merging folds every adapter against the weights from before the first merge (W0, b0 are kept,
on the CPU, while anything is merged), so adapters merged in turn give the sum above and
unmerging the last one restores W0, b0 exactly.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterStateError
from ..lora.mixed_batch import expand_to_batch
from .._core.base_layers import base_of, unobserved
from .._core.call_state import batch_adapter_names
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear` (plain, not a subclass)"


# ---------------------------------------------------------------------- the five paths
class GloraPath(nn.Module):
    """One term of the update; calling it gives its value (broadcastable to the term's shape)."""

    #: True for "none": the term is zero and can be skipped.
    is_zero: bool = False

    def reset_parameters(self, init_weights: bool = True) -> None:
        """Re-draw the path's tensors (True: a no-op value; False: random)."""


class LowRankPath(GloraPath):
    """"lora": `Xd @ Xu`, Xd (rows x r), Xu (r x cols)."""

    def __init__(self, rows: int, cols: int, r: int, init_weights: bool = True) -> None:
        super().__init__()
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        """Xu Kaiming-uniform; Xd zero (True, so Xd @ Xu = 0) or Kaiming-uniform (False)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.Xd)
            else:
                nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class VectorPath(GloraPath):
    """"vector": `X`, a column (features x 1, broadcast over the columns) or a flat (features,) vector."""

    def __init__(self, features: int, column: bool = True, init_weights: bool = True) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros((features, 1) if column else (features,)))
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        """Zero (True) or Kaiming-uniform (False; a flat vector is drawn as one 1 x features row)."""
        with torch.no_grad():
            if init_weights:
                nn.init.zeros_(self.X)
            else:
                nn.init.kaiming_uniform_(self.X if self.X.dim() == 2 else self.X.unsqueeze(0), a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.X


class ScalarPath(GloraPath):
    """"constant": one scalar `X[0]` shared by every element."""

    def __init__(self, init_weights: bool = True) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1))
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        """Zero (True) or N(0, 0.02^2) (False)."""
        with torch.no_grad():
            if init_weights:
                nn.init.zeros_(self.X)
            else:
                nn.init.normal_(self.X, mean=0.0, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class ZeroPath(GloraPath):
    """"none": zeros of the term's shape, a buffer (peft saves it as `...glora_A.zeros`)."""

    is_zero = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return self.zeros


def weight_path(kind: str, out_features: int, in_features: int, r: int, init_weights: bool) -> GloraPath:
    """A or B, broadcastable to out x in."""
    if kind == "lora":
        return LowRankPath(out_features, in_features, r, init_weights)
    if kind == "vector":
        return VectorPath(out_features, column=True, init_weights=init_weights)
    if kind == "constant":
        return ScalarPath(init_weights)
    return ZeroPath((out_features, in_features))


def coupling_path(kind: str, in_features: int, r: int, init_weights: bool, has_bias: bool) -> GloraPath:
    """C, in x 1 (zero without a base bias)."""
    if has_bias and kind == "lora":
        return LowRankPath(in_features, 1, r, init_weights)
    if has_bias and kind == "vector":
        return VectorPath(in_features, column=True, init_weights=init_weights)
    return ZeroPath((in_features, 1))


def bias_path(kind: str, out_features: int, init_weights: bool, has_bias: bool) -> GloraPath:
    """D or E, broadcastable to (out,) (zero without a base bias)."""
    if has_bias and kind == "vector":
        return VectorPath(out_features, column=False, init_weights=init_weights)
    if has_bias and kind == "constant":
        return ScalarPath(init_weights)
    return ZeroPath((out_features,))


# ---------------------------------------------------------------------- the layer
class GloraLayer(BaseTunerLayer, nn.Module):
    """GLoRA over a plain `nn.Linear`: per adapter its rank and its five paths A..E."""

    adapter_layer_names = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")
    other_param_names = ("r",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.glora_A = nn.ModuleDict({})
        self.glora_B = nn.ModuleDict({})
        self.glora_C = nn.ModuleDict({})
        self.glora_D = nn.ModuleDict({})
        self.glora_E = nn.ModuleDict({})
        self._base_before_merge: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        config_A_B: str = "lora",
        config_C: str = "lora",
        config_D_E: str = "constant",
        init_weights: bool = True,
    ) -> None:
        """Add (or replace) adapter `adapter_name`; paths are built A, B, C, D, E (peft's draw order)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        has_bias = self.bias is not None
        out_f, in_f = self.out_features, self.in_features
        self.r[adapter_name] = r
        self.glora_A[adapter_name] = weight_path(config_A_B, out_f, in_f, r, init_weights)
        self.glora_B[adapter_name] = weight_path(config_A_B, out_f, in_f, r, init_weights)
        self.glora_C[adapter_name] = coupling_path(config_C, in_f, r, init_weights, has_bias)
        self.glora_D[adapter_name] = bias_path(config_D_E, out_f, init_weights, has_bias)
        self.glora_E[adapter_name] = bias_path(config_D_E, out_f, init_weights, has_bias)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """As every layer; the zero buffers of "none" paths then take the base dtype (as in peft's files)."""
        super()._move_adapter_to_base(adapter_name, keep_fp32)
        weight = self.weight
        if not weight.is_floating_point():
            return
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            path = container[adapter_name] if adapter_name in container else None
            if isinstance(path, ZeroPath):
                path.zeros.data = path.zeros.data.to(dtype=weight.dtype)

    def reset_glora_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Re-draw every path of `adapter_name`."""
        for attr in self.adapter_layer_names:
            getattr(self, attr)[adapter_name].reset_parameters(init_weights)

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.glora_A]

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        """The dtype of the adapter's parameters (fp32 over a bf16 base); the base's when it has none."""
        for attr in self.adapter_layer_names:
            for param in getattr(self, attr)[adapter_name].parameters():
                return param.dtype
        return self.weight.dtype

    # ------------------------------------------------------------------ the update
    def delta(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(dW, db) of one adapter against the base (W0, b0) given:

            dW = W0 * A + B                       (out x in)
            db = b0 * D + E + (W0 @ C)[:, 0]      (out,), None without a base bias
        """
        a, b = self.glora_A[adapter_name], self.glora_B[adapter_name]
        dtype = weight.dtype
        delta_w = torch.zeros_like(weight) if a.is_zero else weight * a().to(dtype)
        if not b.is_zero:
            delta_w = delta_w + b().to(dtype)
        if bias is None:
            return delta_w, None
        c, d, e = self.glora_C[adapter_name], self.glora_D[adapter_name], self.glora_E[adapter_name]
        delta_b = torch.zeros_like(bias) if d.is_zero else bias * d().to(dtype)
        if not e.is_zero:
            delta_b = delta_b + e().to(dtype)
        if not c.is_zero:
            delta_b = delta_b + (weight @ c().to(dtype)).squeeze(-1)
        return delta_w, delta_b

    def _summed_delta(
        self, names: list[str], dtype: torch.dtype
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """sum over `names` of (dW, db), against the base as it is now, in `dtype`."""
        weight = self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        delta_w, delta_b = self.delta(names[0], weight, bias)
        for name in names[1:]:
            more_w, more_b = self.delta(name, weight, bias)
            delta_w = delta_w + more_w
            delta_b = None if delta_b is None else delta_b + more_b
        return delta_w, delta_b

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + x dW^T + db`, dW and db summed over the active adapters (or per row, mixed batch)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = batch_adapter_names()
        if names is not None:
            return self._mixed_rows(x, names, *args, **kwargs)
        active = self._active_here()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        dtype = self._adapter_dtype(active[0])
        if not args and not kwargs and self._can_fuse(dtype):
            delta_w, delta_b = self._summed_delta(active, dtype)
            bias = self.bias
            return F.linear(x, self.weight + delta_w, None if bias is None else bias + delta_b)
        result = self.base_layer(x, *args, **kwargs)
        delta_w, delta_b = self._summed_delta(active, dtype)
        return (result + F.linear(x.to(dtype), delta_w, delta_b)).to(result.dtype)

    def _can_fuse(self, dtype: torch.dtype) -> bool:
        """One matmul for base and adapters: a plain Linear that nothing observes, in the adapters' dtype."""
        base = self.get_base_layer()
        return type(base) is nn.Linear and unobserved(self.base_layer, base) and base.weight.dtype == dtype

    def _mixed_rows(self, x: torch.Tensor, names: tuple[str, ...], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i adapted by `names[i]` ("__base__" or an adapter this layer lacks: the base output)."""
        result = self.base_layer(x, *args, **kwargs)
        names = expand_to_batch(names, x.shape[0])
        distinct = list(dict.fromkeys(name for name in names if name in self.glora_A))
        if not distinct:
            return result
        result = result.clone()
        for name in distinct:
            rows = torch.tensor([i for i, row_name in enumerate(names) if row_name == name], device=x.device)
            dtype = self._adapter_dtype(name)
            delta_w, delta_b = self._summed_delta([name], dtype)
            update = F.linear(x[rows].to(dtype), delta_w, delta_b)
            result[rows] = (result[rows] + update).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging (against W0, b0)
    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + W0 * A + B, b <- b + b0 * D + E + W0 @ C (W0, b0: from before the first merge)."""
        if not self.merged_adapters or self._base_before_merge is None:
            self._base_before_merge = (
                weight.detach().to("cpu", copy=True),
                None if bias is None else bias.detach().to("cpu", copy=True),
            )
        delta_w, delta_b = self._merge_delta(adapter_name, weight, bias)
        new_bias = None if bias is None else (bias.to(delta_b.dtype) + delta_b).to(bias.dtype)
        return (weight.to(delta_w.dtype) + delta_w).to(weight.dtype), new_bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Undo `fold`; unfolding the last merged adapter gives back W0 and b0 exactly."""
        if self._base_before_merge is None:
            raise AdapterStateError(
                f"GLoRA adapter {adapter_name!r} is marked merged but the weights from before merging are gone; "
                "it cannot be unmerged. Reload the base model."
            )
        if self.merged_adapters == [adapter_name]:
            w0, b0 = self._base_before_merge
            restored_bias = None if b0 is None or bias is None else b0.to(bias.device, bias.dtype, copy=True)
            return w0.to(weight.device, weight.dtype, copy=True), restored_bias
        delta_w, delta_b = self._merge_delta(adapter_name, weight, bias)
        new_bias = None if bias is None else (bias.to(delta_b.dtype) - delta_b).to(bias.dtype)
        return (weight.to(delta_w.dtype) - delta_w).to(weight.dtype), new_bias

    def _merge_delta(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`delta` against the remembered (W0, b0), computed in at least float32, detached."""
        w0, b0 = self._base_before_merge
        compute = torch.promote_types(weight.dtype, torch.float32)
        w0 = w0.to(weight.device, compute)
        b0 = None if b0 is None or bias is None else b0.to(weight.device, compute)
        delta_w, delta_b = self.delta(adapter_name, w0, b0)
        return delta_w.detach(), None if delta_b is None else delta_b.detach()

    def _forget_merge(self, adapter_name: str) -> None:
        if not self.merged_adapters:
            self._base_before_merge = None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: the update `W0 * A + B` and the bias terms are not a fixed low-rank additive delta."""
        return False

    def __repr__(self) -> str:
        return "glora." + super().__repr__()


class Linear(GloraLayer):
    """GLoRA on a plain `nn.Linear`: `y = (W0 + W0 * A + B) x + b0 + b0 * D + E + W0 @ C`."""


#: peft's name of the layer.
GloraLinear = Linear


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A GLoRA layer when `target`'s base is exactly `nn.Linear` (peft refuses subclasses too)."""
    if type(base_of(target)) is nn.Linear:
        return Linear(target, adapter_name, **layer_kwargs)
    return None
