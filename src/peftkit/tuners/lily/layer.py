r"""Lily layers: a per-layer (or per-block) A, a set of Bs shared by every layer of a target, and a router.

    h = A x                                      A: r x in          (`lily_A`, an r-output Linear)
    p = mean over all tokens of softmax(R h)     R: num_B x r       (`lily_router`)
    B = sum_e p_e B_e                            B_e: r x out       (`lily_B`, a Linear out -> num_B * r:
                                                                     its weight, num_B*r x out, holds the B_e
                                                                     stacked)
    y = W0 x + b + scaling * h B

The router mixes the Bs once per call: `p` averages the routing weights over every token of the
batch (as peft), so one row's output depends on the rows beside it. The update is data-dependent,
so it cannot be merged into W0.

Sharing (done by the tuner once a target's layers exist, see `LilyModel`): the layers of one
target (same name and weight shape), in model order, share the first layer's `lily_B` module, and
each run of `stride_A` consecutive layers shares its first layer's `lily_A` module -- the same
module objects, so a tensor trains once and the checkpoint (peft's layout) repeats it under every
layer that uses it.

Init (`init_weights`): True -- A and router Kaiming-uniform, Bs zero (a no-op); False -- Bs too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterStateError
from ...quantization.weights import is_quantized
from .._core.base_layers import base_of
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear` (optionally quantized)"
NOT_MERGEABLE = (
    "This method is not supported for Lily. Lily adapters cannot be merged into the base weights: the router "
    "mixes the Bs per call, so the update is not a fixed weight. Keep the PeftModel for inference, or call "
    "unload() to get the base model back."
)


class LilyMergeError(AdapterStateError, NotImplementedError):
    """Merging a Lily adapter (peft raises NotImplementedError)."""


class LilyLayer(BaseTunerLayer, nn.Module):
    """What every Lily layer holds per adapter: `lily_A`, `lily_B`, `lily_router` (Linears), r, scaling, stride_A, num_B."""

    adapter_layer_names = ("lily_A", "lily_B", "lily_router")
    other_param_names = ("r", "scaling", "stride_A", "num_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.stride_A: dict[str, int] = {}
        self.num_B: dict[str, int] = {}
        self.lily_A = nn.ModuleDict({})
        self.lily_B = nn.ModuleDict({})
        self.lily_router = nn.ModuleDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        scaling: float = 1.0,
        stride_A: int = 1,
        num_B: int = 2,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: this layer's own A, Bs and router (shared later by the tuner)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.stride_A[adapter_name] = stride_A
        self.num_B[adapter_name] = num_B
        self.lily_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lily_B[adapter_name] = nn.Linear(self.out_features, num_B * r, bias=False)
        self.lily_router[adapter_name] = nn.Linear(r, num_B, bias=False)
        self.reset_lily_parameters(adapter_name, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def reset_lily_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Kaiming-uniform A and router; Bs zero (True) or Kaiming-uniform (False)."""
        if adapter_name not in self.lily_A:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lily_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lily_router[adapter_name].weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.lily_B[adapter_name].weight)
            else:
                nn.init.kaiming_uniform_(self.lily_B[adapter_name].weight, a=math.sqrt(5))

    # ------------------------------------------------------------------ forward
    def combined_B(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """sum_e p_e B_e (r x out), p the token-mean of the router's softmax over `hidden` (..., r)."""
        num_B = self.num_B[adapter_name]
        stacked = self.lily_B[adapter_name].weight.reshape(num_B, -1, self.out_features)  # num_B x r x out
        routing = F.softmax(self.lily_router[adapter_name](hidden), dim=-1)
        weights = routing.reshape(-1, num_B).mean(dim=0)
        return torch.einsum("e,eio->io", weights, stacked)

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """scaling * (A x) (sum_e p_e B_e), in the adapter's dtype."""
        hidden = self.lily_A[adapter_name](x.to(self.lily_A[adapter_name].weight.dtype))
        return (hidden @ self.combined_B(adapter_name, hidden)) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + sum_a delta_a(x)` over the active adapters, in the base output's dtype."""
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters:
            return result
        out_dtype = result.dtype
        for adapter_name in self._active_adapter:
            if adapter_name in self.lily_A:
                result = result + self.delta_output(x, adapter_name).to(out_dtype)
        return result

    # ------------------------------------------------------------------ no merging (as peft)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise LilyMergeError(NOT_MERGEABLE)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise LilyMergeError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        raise LilyMergeError(NOT_MERGEABLE)

    def _check_merge(self, names: list[str], safe_merge: bool) -> None:
        raise LilyMergeError(NOT_MERGEABLE)

    def __repr__(self) -> str:
        return "lily." + super().__repr__()


class Linear(LilyLayer):
    """Lily on `nn.Linear` or a quantized linear layer (peft's class name)."""


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A Lily `Linear` around an `nn.Linear` (or quantized linear); anything else is refused as peft refuses it."""
    base = base_of(target)
    if isinstance(base, nn.Linear) or is_quantized(base):
        return Linear(target, adapter_name, **layer_kwargs)
    raise NotImplementedError(f"Lily does not support target modules of type {type(base)} yet.")
