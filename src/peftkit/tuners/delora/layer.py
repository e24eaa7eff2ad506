r"""DeLoRA layers: a low-rank update whose Frobenius norm is bounded by a trained scalar lambda.

    y = W0 x + b + B diag(s) A (w * x)         s_i = (lambda / r) / (|A_i| |B^i|)
                                               w_j = |W0^j|  (norm of column j of W0, fixed at creation)

    A: r x in (rows A_i)   B: out x r (columns B^i)   lambda: (1,)   w: (in,)
    saved as `delora_A`, `delora_B`, `delora_lambda` and the buffer `delora_w_norm`

Each rank-one term `B^i A_i / (|A_i| |B^i|)` has unit norm, so `||B diag(s) A||_F <= lambda`
whatever the directions learn: the angle (A, B) and the strength (lambda) are decoupled. The
column norms `w` of the frozen weight, taken once when the adapter is created (and saved with
it), scale the update per input channel:

    delta_W = B diag(s) A diag(w)              (`get_delta_weight`; merging adds it to W0)

Norms are clamped at 1e-4, so the zero B of the default init (True: A Kaiming-uniform, B = 0)
gives delta_W = 0 and finite gradients. With init_weights=False both are Kaiming-uniform.
The forward never forms delta_W: `x -> (w * x) A^T -> * s -> B^T`, O(tokens * r * (in + out)).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...quantization.weights import is_quantized
from .._core.base_layers import base_of
from .._core.layer import BaseTunerLayer
from ..vblora.shared import BufferDict, UnsupportedLayerError

#: Smallest row / column norm used in the scaling (peft's clamp).
NORM_FLOOR = 1e-4


def delora_scaling(A: torch.Tensor, B: torch.Tensor, boundary: torch.Tensor, r: int) -> torch.Tensor:
    """s_i = (lambda / r) / (|A_i| |B^i|), the norms clamped at `NORM_FLOOR`; shape (r,)."""
    row_norms = A.norm(dim=1).clamp(min=NORM_FLOOR)
    column_norms = B.norm(dim=0).clamp(min=NORM_FLOOR)
    return (boundary / r) / (row_norms * column_norms)


class DeloraLayer(BaseTunerLayer, nn.Module):
    """DeLoRA on an `nn.Linear`: per adapter A, B, lambda, the rank, the input dropout and w = |W0^j|."""

    adapter_layer_names = ("delora_A", "delora_B", "delora_lambda")
    other_param_names = ("r", "delora_dropout", "delora_w_norm")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise UnsupportedLayerError(f"Unsupported layer type {type(base)}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.delora_dropout = nn.ModuleDict({})
        self.delora_A = nn.ParameterDict({})
        self.delora_B = nn.ParameterDict({})
        self.delora_lambda = nn.ParameterDict({})
        self.delora_w_norm = BufferDict(persistent=True)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        delora_lambda: float = 15.0,
        module_dropout: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name` with rank `r` and initial boundary `delora_lambda`."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.delora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.delora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.delora_lambda[adapter_name] = nn.Parameter(torch.empty(1))
        self.delora_dropout[adapter_name] = nn.Dropout(p=module_dropout) if module_dropout > 0.0 else nn.Identity()
        self.reset_delora_parameters(adapter_name, init_weights, delora_lambda)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def reset_delora_parameters(self, adapter_name: str, init_weights: bool = True, delora_lambda: float = 15.0) -> None:
        """Kaiming-uniform A; B zero (True) or Kaiming-uniform (False); lambda filled; w = |W0^j| taken now."""
        if adapter_name not in self.delora_A:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.delora_A[adapter_name], a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.delora_B[adapter_name])
            else:
                nn.init.kaiming_uniform_(self.delora_B[adapter_name], a=math.sqrt(5))
            self.delora_lambda[adapter_name].fill_(float(delora_lambda))
            weight = self.get_base_layer().weight
            if weight.is_meta:  # no values to take the norms of (peft uses ones)
                self.delora_w_norm[adapter_name] = torch.ones(self.in_features, device=weight.device)
            else:
                self.delora_w_norm[adapter_name] = weight.detach().norm(dim=0)

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """The core's rule for A, B, lambda; the w buffer follows A (device and dtype)."""
        super()._move_adapter_to_base(adapter_name, keep_fp32)
        if adapter_name in self.delora_w_norm and adapter_name in self.delora_A:
            reference = self.delora_A[adapter_name]
            norms = self.delora_w_norm[adapter_name]
            device = norms.device if reference.is_meta else reference.device
            self.delora_w_norm[adapter_name] = norms.to(device, reference.dtype)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """A, B, lambda and the buffer w, under peft's keys (`<module>.delora_w_norm`)."""
        state = super().adapter_state(adapter_name, prefix)
        if adapter_name in self.delora_w_norm and state:
            state[f"{prefix}.delora_w_norm"] = self.delora_w_norm[adapter_name]
        return state

    def _scaling(self, adapter_name: str) -> torch.Tensor:
        return delora_scaling(
            self.delora_A[adapter_name], self.delora_B[adapter_name], self.delora_lambda[adapter_name], self.r[adapter_name]
        )

    # ------------------------------------------------------------------ forward and merging
    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`B (s * (A (w * dropout(x))))`, computed in the adapter's dtype."""
        A, B = self.delora_A[adapter_name], self.delora_B[adapter_name]
        inputs = self.delora_dropout[adapter_name](x.to(A.dtype))
        hidden = F.linear(inputs * self.delora_w_norm[adapter_name].to(A.dtype), A) * self._scaling(adapter_name)
        return F.linear(hidden, B)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + sum_a delta_a(x)` over the active adapters; the result in the base output's dtype."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = [name for name in self._active_adapter if name in self.delora_A]
        if self.merged or not active:
            return result
        out_dtype = result.dtype
        for adapter_name in active:
            result = result + self.delta_output(x, adapter_name).to(out_dtype)
        return result.to(out_dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = B diag(s) A diag(w), out x in."""
        if adapter_name not in self.delora_A:
            raise ValueError(f"Adapter {adapter_name} not found.")
        A, B = self.delora_A[adapter_name], self.delora_B[adapter_name]
        return (B * self._scaling(adapter_name)) @ A * self.delora_w_norm[adapter_name].to(A.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: delta_W is a rank-r product (as peft)."""
        return True

    def __repr__(self) -> str:
        return "delora." + super().__repr__()


class DeloraLinear(DeloraLayer):
    """DeLoRA on `nn.Linear` (peft's class name)."""


SUPPORTED_LAYERS = "`torch.nn.Linear`"


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A `DeloraLinear` around an `nn.Linear` (not quantized); anything else is refused with peft's TypeError."""
    base = base_of(target)
    if isinstance(base, nn.Linear) and not is_quantized(base):
        return DeloraLinear(target, adapter_name, **layer_kwargs)
    raise UnsupportedLayerError(
        f"Target module {target} is not supported. Currently, only `torch.nn.Linear` is supported."
    )
