r"""PEANuT layers: a small network reads the frozen weight and writes the update (weight-aware).

    delta_W^T = scaling * B( g( f(W^T A^T) ) )          W: out x in (frozen), W^T: in x out
    y         = W x + b + delta_W x

    A: out -> r (`peanut_A`), B: r -> out (`peanut_B`), both bias-free linears; f: the activation.
    g, with depth d: d encoders E_1..E_d, then d decoders D_1..D_d with skips (U-Net style):

        h_0 = f(W^T A^T)                        (in x r: each input column of W, encoded)
        h_k = f(E_k h_{k-1})                    k = 1..d, keeping h_0..h_{d-1}
        u_0 = h_d;  u_k = f(D_k u_{k-1}) + h_{d-k}   k = 1..d
        delta_W^T = scaling * B u_d             (in x out)

Unlike LoRA, A acts on the *output* dimension of W. `init_weights=True`: A, E, D Kaiming-uniform,
B = 0 (a no-op); False: B Kaiming-uniform too.

The update is a function of W, so merging uses the weight from before the first merge (kept on
the CPU while anything is merged): `W = W0 + sum_a delta_W_a(W0)`; unmerging the last adapter
restores that copy exactly. The forward recomputes the update from the live weight each call
(O(in * out * r)), as the method requires.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from transformers.activations import ACT2FN

from ...errors import AdapterStateError, TargetModulesError
from .._core.base_layers import base_of
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear`"


class UnsupportedLayerError(TargetModulesError, NotImplementedError):
    """PEANuT cannot wrap this layer type (peft raises NotImplementedError)."""


class PeanutLayer(BaseTunerLayer, nn.Module):
    """What every PEANuT layer holds: per adapter A, B, the hidden encoders / decoders and the settings."""

    adapter_layer_names = ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders")
    other_param_names = ("r", "depth", "scaling", "act_fn", "res_num")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.r: dict[str, int] = {}
        self.depth: dict[str, int] = {}
        self.res_num: dict[str, int] = {}  # peft's name for the number of skip connections (= depth)
        self.scaling: dict[str, float] = {}
        self.act_fn: dict[str, str] = {}
        self.peanut_A = nn.ModuleDict({})
        self.peanut_B = nn.ModuleDict({})
        self.peanut_encoders = nn.ModuleDict({})
        self.peanut_decoders = nn.ModuleDict({})
        self._base_weight_before_merge: Optional[torch.Tensor] = None
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self, adapter_name: str, r: int, depth: int = 0, act_fn: str = "relu", scaling: float = 1.0,
        init_weights: bool = True, inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: A (out -> r), `depth` encoders and decoders (r -> r), B (r -> out)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.depth[adapter_name] = depth
        self.res_num[adapter_name] = depth
        self.scaling[adapter_name] = scaling
        self.act_fn[adapter_name] = act_fn
        self.peanut_A[adapter_name] = nn.Linear(self.out_features, r, bias=False)
        self.peanut_encoders[adapter_name] = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(depth)])
        self.peanut_decoders[adapter_name] = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(depth)])
        self.peanut_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.reset_peanut_parameters(adapter_name, init_weights=init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def reset_peanut_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Kaiming-uniform A, encoders and decoders; B zero (`init_weights`) or Kaiming-uniform too."""
        if adapter_name not in self.peanut_A:
            return
        hidden = [*self.peanut_encoders[adapter_name], *self.peanut_decoders[adapter_name]]
        with torch.no_grad():
            for linear in [self.peanut_A[adapter_name], *hidden]:
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.peanut_B[adapter_name].weight)
            else:
                nn.init.kaiming_uniform_(self.peanut_B[adapter_name].weight, a=math.sqrt(5))

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.peanut_A]

    # ------------------------------------------------------------------ the update
    def _update_transposed(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`delta_W^T` (in x out) for base weight `weight` (out x in), in the adapter's dtype."""
        if adapter_name not in self.peanut_A:
            raise ValueError(f"Adapter {adapter_name} not found.")
        activation = ACT2FN[self.act_fn[adapter_name]]
        project_in = self.peanut_A[adapter_name]
        hidden = activation(project_in(weight.T.to(project_in.weight.dtype)))
        skips = []
        for encoder in self.peanut_encoders[adapter_name]:
            skips.append(hidden)
            hidden = activation(encoder(hidden))
        for decoder, skip in zip(self.peanut_decoders[adapter_name], reversed(skips)):
            hidden = activation(decoder(hidden)) + skip
        return self.peanut_B[adapter_name](hidden) * self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W (out x in) computed from the live base weight."""
        return self._update_transposed(adapter_name, self.get_base_layer().weight).T

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + sum_a x delta_W_a^T` over the active adapters held here."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return result
        weight = self.get_base_layer().weight
        for name in active:
            update = self._update_transposed(name, weight)
            result = result + (x.to(update.dtype) @ update).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging (the update reads W0)
    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + delta_W(W0) (W0: the weight before the first merge, remembered while anything is merged)."""
        if not self.merged_adapters or self._base_weight_before_merge is None:
            self._base_weight_before_merge = weight.detach().to("cpu", copy=True)
        return self._shifted(adapter_name, weight, sign=1.0), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W - delta_W(W0); unfolding the last merged adapter gives back W0 exactly."""
        if self._base_weight_before_merge is None:
            raise AdapterStateError(
                f"PEANuT adapter {adapter_name!r} is marked merged but the weight from before merging is gone; "
                "it cannot be unmerged. Reload the base model."
            )
        if self.merged_adapters == [adapter_name]:
            return self._base_weight_before_merge.to(weight.device, weight.dtype, copy=True), bias
        return self._shifted(adapter_name, weight, sign=-1.0), bias

    def _shifted(self, adapter_name: str, weight: torch.Tensor, sign: float) -> torch.Tensor:
        base = self._base_weight_before_merge.to(weight.device, weight.dtype)
        delta = self._update_transposed(adapter_name, base).T.detach().to(weight.dtype)
        return weight + sign * delta

    def _forget_merge(self, adapter_name: str) -> None:
        if not self.merged_adapters:
            self._base_weight_before_merge = None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: the update is a non-linear function of W, not a fixed low-rank product."""
        return False

    def __repr__(self) -> str:
        return "peanut." + super().__repr__()


class Linear(PeanutLayer):
    """PEANuT on `nn.Linear`."""


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A PEANuT `Linear` for a stock dense linear base; any other layer: peft's NotImplementedError."""
    base = base_of(target)
    if isinstance(base, nn.Linear) and isinstance(getattr(base, "weight", None), nn.Parameter) \
            and base.weight.is_floating_point():
        return Linear(target, adapter_name, **layer_kwargs)
    raise UnsupportedLayerError(
        f"PEANuT does not support target modules of type {type(base)} yet. Supported: {SUPPORTED_LAYERS}; "
        "narrow target_modules or add the module to exclude_modules."
    )
