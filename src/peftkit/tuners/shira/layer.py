r"""SHiRA layers: a sparse, high-rank update of K chosen entries of the frozen weight.

    y = (W + scaling * S) x + b         S (out x in): zero except S[rows[k], cols[k]] = v[k], k < K

      W (out x in, frozen)        S: K = r (out + in) trained values at fixed positions
      +-----------------+         +-----------------+
      |                 |    +    | .  v0     .  v1 |      (saved as `shira_weight` (K,) and
      |                 |         |   v2  .  v3     |       `shira_indices` (2, K) int32)
      +-----------------+         +-----------------+

The positions come from the config's mask function (a random mask by default) when the adapter
is created, and from the checkpoint when one is loaded. `init_weights=True` starts v at 0 (a
no-op), False draws v ~ N(0, 1). `scaling` is 1 unless `set_scale` changes it (at inference).

Forward. S is scattered into a dense (out x in) tensor once per call (O(out * in), like the base
matmul itself). Over a plain `nn.Linear` that nothing observes, base and adapter are one matmul,
`y = (W + S) x + b` (peft's way); otherwise -- hooks on the base, extra arguments, a quantized
base -- `y = base(x) + S x`. Merging adds S to W (requantizing quantized bases).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...quantization.weights import is_quantized
from .._core.base_layers import base_of, is_plain_linear, linear_features, unobserved
from .._core.buffer_dict import BufferDict
from .._core.layer import BaseTunerLayer
from ..vblora.shared import refuse_unsupported
from .mask_functions import num_shira_values

SUPPORTED_LAYERS = "`torch.nn.Linear` (and quantized linear layers)"


class ShiraLayer(BaseTunerLayer, nn.Module):
    """What every SHiRA layer holds: per adapter its rank, scaling, trained values and their positions."""

    adapter_layer_names = ("shira_weight",)
    other_param_names = ("r", "scaling", "shira_indices")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        if self.base_layer is not self.get_base_layer():
            raise ValueError("SHiRA does not support nested base layers")
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.shira_weight = nn.ParameterDict({})
        # Frozen int positions: buffers (they follow `.to(device)`) left out of the module's
        # state_dict, as peft keeps them in a plain dict; checkpoints get them via `adapter_state`.
        self.shira_indices = BufferDict(persistent=False)
        self.in_features, self.out_features = linear_features(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self, adapter_name: str, mask: Optional[torch.Tensor], r: int, init_weights: bool = True, inference_mode: bool = False
    ) -> None:
        """Add (or replace) adapter `adapter_name`: K = r (out + in) values at the mask's positions."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        count = num_shira_values(self.in_features, self.out_features, r)
        if count > self.in_features * self.out_features:
            raise ValueError(
                f"The set rank {r} results in more shira params than the total number of params in the base layer "
                f"{self.in_features * self.out_features} and this is not allowed."
            )
        values = torch.zeros(count) if init_weights else torch.randn(count)
        indices = None
        if mask is not None:
            indices = torch.stack(torch.where(mask == 1.0)).to(torch.int)
            if indices.shape[1] != count:
                raise ValueError(
                    f"The SHiRA indices and weights are not the same dimensions for adapter {adapter_name} in layer "
                    f"{self.base_layer}: the mask has {indices.shape[1]} ones, r * (in + out) = {count}."
                )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = 1.0  # can be changed (set_scale) at inference
        self.shira_weight[adapter_name] = nn.Parameter(values)
        if indices is not None:
            self.set_indices(adapter_name, indices)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def set_indices(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Store the (2, K) positions (row, column) of `adapter_name`'s values, as int32 on the base's device."""
        weight = getattr(self.get_base_layer(), "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else indices.device
        self.shira_indices[adapter_name] = indices.to(device=device, dtype=torch.int)

    def reset_shira_parameters(self, adapter_name: str) -> None:
        """Zero the values of `adapter_name` (a no-op adapter again)."""
        nn.init.zeros_(self.shira_weight[adapter_name])

    def set_scale(self, adapter: str, scale: float) -> None:
        """peft's inference-time scale of one adapter: `S <- scale * S` in the forward and merges."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """`<module>.shira_weight` and, as peft saves them, the positions `<module>.shira_indices`."""
        state = super().adapter_state(adapter_name, prefix)
        if adapter_name in self.shira_indices and state:
            state[f"{prefix}.shira_indices"] = self.shira_indices[adapter_name]
        return state

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.shira_weight]

    # ------------------------------------------------------------------ the update
    def _scatter_into(self, dense: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`dense + scaling * S` for one adapter (out of place; differentiable in the values)."""
        values = self.shira_weight[adapter_name] * self.scaling[adapter_name]
        indices = self.shira_indices[adapter_name].to(device=dense.device, dtype=torch.long)
        return dense.index_put((indices[0], indices[1]), values.to(dense.dtype), accumulate=True)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`scaling * S` as a dense (out x in) tensor (peft returns the same values as a sparse COO tensor)."""
        values = self.shira_weight[adapter_name]
        zeros = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=values.device)
        return self._scatter_into(zeros, adapter_name)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + scaling * S, added in at least float32 before rounding to W's dtype."""
        compute = torch.promote_types(weight.dtype, self.shira_weight[adapter_name].dtype)
        return self._scatter_into(weight.to(compute), adapter_name).to(weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W - scaling * S."""
        compute = torch.promote_types(weight.dtype, self.shira_weight[adapter_name].dtype)
        delta = self.get_delta_weight(adapter_name).to(weight.device, compute)
        return (weight.to(compute) - delta).to(weight.dtype), bias

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`(W + sum_a scaling_a S_a) x + b` over the active adapters held here."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if not args and not kwargs and is_plain_linear(base) and unobserved(self.base_layer, base):
            weight = base.weight
            compute = torch.promote_types(weight.dtype, self.shira_weight[active[0]].dtype)
            adapted = weight.to(compute)
            for name in active:
                adapted = self._scatter_into(adapted, name)
            return F.linear(x, adapted.to(weight.dtype), base.bias)
        result = self.base_layer(x, *args, **kwargs)
        delta = self.get_delta_weight(active[0])
        for name in active[1:]:
            delta = self._scatter_into(delta, name)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: a sparse update has no useful low-rank form (as peft)."""
        return False

    def __repr__(self) -> str:
        return "shira." + super().__repr__()


class Linear(ShiraLayer):
    """SHiRA on `nn.Linear` or a quantized linear layer."""


def is_supported(base: nn.Module) -> bool:
    """Whether SHiRA wraps `base`: an `nn.Linear` or a quantized linear layer (not GPT-2's `Conv1D`, as peft)."""
    return isinstance(base, nn.Linear) or is_quantized(base)


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A SHiRA `Linear` for a dense or quantized linear base, else None."""
    if is_supported(base_of(target)):
        return Linear(target, adapter_name, **layer_kwargs)
    return None


#: The last dispatcher: peft's TypeError for every other layer type.
refuse_other_layers = refuse_unsupported("SHiRA", SUPPORTED_LAYERS)
