r"""Super-Tuning layers: a frozen `nn.Linear` whose largest- (or smallest-) magnitude entries train.

    W' = W + scatter(indices, values)            indices: (k,) int32 flat positions into W (out x in)
                                                 values:  (k,) trained,  k = int(out * in * (1 - sparsity))
    y  = W' x + b  [+ (lora_alpha / r) B A dropout(x)]        the LoRA part ("Supra") when r is set

The support is chosen once per adapter, `topk(|W|.flatten(), k, largest=select_top)`, from the
base weight (no data needed), and saved with the adapter (`<module>.supertuning_indices`) unless
`save_precomputed_indices=False` (then it is chosen again, from the same weights, when loading).

Initialisation: values = 0 and B = 0 (a no-op) with `init_weights=True`; values ~ N(0, 1) and B
Kaiming-uniform otherwise. A is Kaiming-uniform either way (LoRA's rule).

Forward: the active adapters' values are scattered into a copy of W and the layer runs as one
linear op (the base layer's own forward, and its hooks, are bypassed; peft warns once about hooks).
Merging adds the same scatter (and B A) to W; unmerging subtracts it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import wraps
from .._core.buffer_dict import BufferDict
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear`"


def support_size(num_params: int, sparsity: float) -> int:
    """How many entries train at `sparsity`: int(num_params * (1 - sparsity))."""
    return int(num_params * (1 - sparsity))


def magnitude_support(weight: torch.Tensor, sparsity: float, select_top: bool) -> torch.Tensor:
    """The flat positions (int32) of the `support_size` largest (or smallest) |W| entries."""
    scores = weight.detach().abs().flatten()
    count = support_size(scores.numel(), sparsity)
    if count < 1:
        raise ConfigError(
            f"sparsity={sparsity} leaves no trainable entries for a weight with {scores.numel()} "
            "elements — no parameter would be adapted. Lower the sparsity so at least one entry is trainable."
        )
    _, indices = torch.topk(scores, k=count, largest=select_top)
    return indices.to(torch.int32)


class SupertuningLayer(BaseTunerLayer, nn.Module):
    """Super-Tuning over an `nn.Linear`: per adapter its support (indices), values and optional LoRA A / B."""

    adapter_layer_names = ("supertuning_values", "supertuning_lora_A", "supertuning_lora_B")
    other_param_names = ("supertuning_indices", "supertuning_rank", "supertuning_lora_alpha", "supertuning_lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, save_precomputed_indices: bool = True,
                 **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.supertuning_values = nn.ParameterDict({})
        # Persistent as the first adapter of the layer asks (peft's rule; all adapters must agree anyway).
        self.supertuning_indices = BufferDict(persistent=save_precomputed_indices)
        self.supertuning_rank: dict[str, int] = {}
        self.supertuning_lora_alpha: dict[str, float] = {}
        self.supertuning_lora_A = nn.ModuleDict({})
        self.supertuning_lora_B = nn.ModuleDict({})
        self.supertuning_lora_dropout = nn.ModuleDict({})
        self._warned_about_hooks = False
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        sparsity: float = 0.99,
        select_top: bool = True,
        r: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        """Add `adapter_name`: its support from |W|, values (0 or N(0, 1)), and with `r` LoRA A, B."""
        weight = self.get_base_layer().weight
        indices = magnitude_support(weight, sparsity, select_top)
        device = weight.device
        self.supertuning_indices[adapter_name] = indices.to(device)
        # Drawn in peft's order: values, then (Supra) A's and B's Linear inits, A's Kaiming init, B's.
        values = torch.zeros(indices.numel()) if init_weights else torch.randn(indices.numel())
        self.supertuning_values[adapter_name] = nn.Parameter(values.to(device if not weight.is_meta else "cpu"))
        if r is not None:
            self.supertuning_rank[adapter_name] = r
            self.supertuning_lora_alpha[adapter_name] = float(lora_alpha if lora_alpha is not None else 2 * r)
            lora_a = nn.Linear(self.in_features, r, bias=False)
            lora_b = nn.Linear(r, self.out_features, bias=False)
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(lora_b.weight)
            else:
                nn.init.kaiming_uniform_(lora_b.weight, a=math.sqrt(5))
            self.supertuning_lora_A[adapter_name] = lora_a
            self.supertuning_lora_B[adapter_name] = lora_b
            self.supertuning_lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        else:
            self.supertuning_rank[adapter_name] = 0
            self.supertuning_lora_alpha[adapter_name] = 0.0
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """The trained tensors, and the support's indices when they are saved (peft's keys)."""
        state = super().adapter_state(adapter_name, prefix)
        if self.supertuning_indices.persistent and adapter_name in self.supertuning_indices:
            state[f"{prefix}.supertuning_indices"] = self.supertuning_indices[adapter_name]
        return state

    # ------------------------------------------------------------------ the update
    def _lora_delta(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """(lora_alpha / r) B A, (out, in)."""
        scale = self.supertuning_lora_alpha[adapter_name] / self.supertuning_rank[adapter_name]
        lora_a = self.supertuning_lora_A[adapter_name].weight
        lora_b = self.supertuning_lora_B[adapter_name].weight
        return (scale * (lora_b @ lora_a)).to(dtype)

    def _scattered(self, flat_weight: torch.Tensor, adapter_name: str, sign: float = 1.0) -> torch.Tensor:
        indices = self.supertuning_indices[adapter_name].to(flat_weight.device, torch.int64)
        values = self.supertuning_values[adapter_name].to(flat_weight.device, flat_weight.dtype)
        return flat_weight.scatter_add(0, indices, values if sign > 0 else -values)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = scatter(indices, values) (+ (alpha / r) B A in Supra mode), (out, in)."""
        weight = self.get_base_layer().weight
        delta = self._scattered(torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device), adapter_name)
        delta = delta.reshape_as(weight)
        if self.supertuning_rank[adapter_name] > 0:
            delta = delta + self._lora_delta(adapter_name, weight.dtype).to(weight.device)
        return delta

    def fold(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + scatter(values) (+ LoRA), the scatter added in place of a dense delta."""
        merged = self._scattered(weight.reshape(-1), adapter_name).reshape_as(weight)
        if self.supertuning_rank[adapter_name] > 0:
            merged = merged + self._lora_delta(adapter_name, weight.dtype).to(weight.device)
        return merged, bias

    def unfold(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W (- LoRA) - scatter(values): `fold` undone in peft's order."""
        if self.supertuning_rank[adapter_name] > 0:
            weight = weight - self._lora_delta(adapter_name, weight.dtype).to(weight.device)
        return self._scattered(weight.reshape(-1), adapter_name, sign=-1.0).reshape_as(weight), bias

    # ------------------------------------------------------------------ forward
    def _warn_about_hooks(self) -> None:
        """peft's warning (once per layer): hooks on the base layer are bypassed by this forward."""
        if self._warned_about_hooks:
            return
        base = self.get_base_layer()
        if any([base._forward_hooks, base._forward_pre_hooks, base._backward_hooks, base._backward_pre_hooks]):
            warnings.warn(
                "One of the base layers adapted with Super-Tuning has backward/forward (pre) hooks set which will be "
                "ignored by the adapter's forward implementation. Please set the hooks on the adapted layer instead "
                "(i.e., apply the hooks on the same path but after applying the PEFT config).",
                stacklevel=3,
            )
        self._warned_about_hooks = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.supertuning_values]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        self._warn_about_hooks()
        base = self.get_base_layer()
        weight = base.weight
        flat = weight.reshape(-1)
        for name in active:
            flat = self._scattered(flat, name)
        result = F.linear(x, flat.reshape_as(weight), base.bias)
        for name in active:
            if self.supertuning_rank[name] > 0:
                lora_a = self.supertuning_lora_A[name]
                lora_b = self.supertuning_lora_B[name]
                scale = self.supertuning_lora_alpha[name] / self.supertuning_rank[name]
                dropped = self.supertuning_lora_dropout[name](x).to(lora_a.weight.dtype)
                result = result + (scale * lora_b(lora_a(dropped))).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "supertuning." + super().__repr__()


Linear = SupertuningLayer
#: nn.Linear only (peft's Super-Tuning wraps nothing else).
dispatch_linear = wraps(nn.Linear, SupertuningLayer)
