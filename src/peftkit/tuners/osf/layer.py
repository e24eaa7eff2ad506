r"""OSF layers: a frozen Linear whose weight is split by its SVD into a frozen and a trained part.

    W = U S V^T  (at creation, float32)       k = effective_rank
      = U_high S_high V_high  +  U_low0 S_low0 V_low0          (top k | the other min(out, in) - k)
    trained: U_low (out x r), S_low (r,), V_low (r x in), starting at U_low0, S_low0, V_low0
    delta_W = U_low diag(S_low) V_low - U_low0 diag(S_low0) V_low0
    y = W x + b + delta_W x        (so the effective weight is U_high S_high V_high + U_low S_low V_low)

The forward never forms delta_W: it is a rank-2r product, `[U_low S_low, -U_low0 S_low0] [V_low; V_low0]`,
applied as two thin matmuls (peft's factored forward). Gradients of U_low / V_low are projected
orthogonally to the frozen high subspace (`projection.py`).

Only U_low, S_low, V_low are saved (`osf_svd_params.{U_low,S_low,V_low}`); the frozen initial low
part and the high part needed by the projection are non-persistent buffers rebuilt from the base
weight's SVD when the adapter is created or loaded, as peft does. Merging adds delta_W; unmerging is
not possible (peft's rule: the layer warns, the model raises).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import wraps
from .._core.layer import BaseTunerLayer
from .._core.buffer_dict import BufferDict
from .projection import project_columns, project_rows

SUPPORTED_LAYERS = "torch.nn.Linear (dense float weights)"
UNMERGE_WARNING = "OSF does not support unmerging. Original weights are permanently modified."
FACTORS = ("U_low", "S_low", "V_low")


def decompose_weight(weight: torch.Tensor, effective_rank: int) -> dict[str, torch.Tensor]:
    """peft's split of an (out, in) weight: float32 SVD, factors cast back to the weight's dtype.

    Returns U_high (out x k), S_high (k,), V_high (k x in) and U_low, S_low, V_low (the rest),
    k = min(effective_rank, min(out, in)).
    """
    left, values, right = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    k = min(effective_rank, values.shape[0])
    parts = {
        "U_high": left[:, :k], "S_high": values[:k], "V_high": right[:k, :],
        "U_low": left[:, k:], "S_low": values[k:], "V_low": right[k:, :],
    }
    return {name: part.contiguous().to(weight.dtype) for name, part in parts.items()}


class OSFLayer(BaseTunerLayer, nn.Module):
    """What every OSF layer holds: per adapter the trained low factors and the frozen, unsaved SVD parts."""

    adapter_layer_names = ("osf_svd_params",)
    other_param_names = (
        "_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high", "effective_rank",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.osf_svd_params = nn.ModuleDict({})
        self._osf_U_low_init = BufferDict(persistent=False)
        self._osf_S_low_init = BufferDict(persistent=False)
        self._osf_V_low_init = BufferDict(persistent=False)
        # The high part is kept only for the non-square factor: the square one's complement is the low init.
        self._osf_U_high = BufferDict(persistent=False)
        self._osf_V_high = BufferDict(persistent=False)
        self.effective_rank: dict[str, int] = {}
        self.cast_input_dtype_enabled = True
        self.out_features, self.in_features = self.get_base_layer().weight.shape
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(
        self, adapter_name: str, effective_rank: int, init_weights: Optional[bool] = True, inference_mode: bool = False
    ) -> None:
        """Add (or replace) adapter `adapter_name`, splitting the current base weight at `effective_rank`."""
        if effective_rank <= 0:
            raise ConfigError(
                f"`effective_rank` should be a positive integer value but the value passed is {effective_rank}"
            )
        weight = self.get_base_layer().weight
        if not weight.is_floating_point():
            raise TypeError(f"OSF needs a float base weight for its SVD; this one is {weight.dtype}.")
        with torch.no_grad():
            parts = decompose_weight(weight.detach(), effective_rank)
        self.effective_rank[adapter_name] = effective_rank
        self._osf_U_low_init[adapter_name] = parts["U_low"].clone()
        self._osf_S_low_init[adapter_name] = parts["S_low"].clone()
        self._osf_V_low_init[adapter_name] = parts["V_low"].clone()
        if self.out_features > self.in_features:  # U (out x in) is not square
            self._osf_U_high[adapter_name] = parts["U_high"]
        if self.out_features < self.in_features:  # V (out x in) is not square
            self._osf_V_high[adapter_name] = parts["V_high"]
        # False (tests): random factors, in peft's order; the frozen init parts stay the SVD's.
        start = {name: torch.randn_like(parts[name]) if init_weights is False else parts[name] for name in FACTORS}
        self.osf_svd_params[adapter_name] = nn.ParameterDict({name: nn.Parameter(start[name]) for name in FACTORS})
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """The core rule for the trained factors; the frozen buffers follow them (peft casts both)."""
        super()._move_adapter_to_base(adapter_name, keep_fp32=keep_fp32)
        if adapter_name not in self.osf_svd_params:
            return
        dtype = self.osf_svd_params[adapter_name]["U_low"].dtype
        device = self.get_base_layer().weight.device
        for attr in ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high"):
            container = getattr(self, attr)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device, dtype)

    # ------------------------------------------------------------------ the maths
    def trained_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_low, S_low, V_low), U_low and V_low wrapped so that their gradients are projected."""
        params = self.osf_svd_params[adapter_name]
        left, values, right = params["U_low"], params["S_low"], params["V_low"]
        if adapter_name in self._osf_U_high:
            left = project_rows(left, self._osf_U_high[adapter_name], keep=False)
        else:
            left = project_rows(left, self._osf_U_low_init[adapter_name], keep=True)
        if adapter_name in self._osf_V_high:
            right = project_columns(right, self._osf_V_high[adapter_name], keep=False)
        else:
            right = project_columns(right, self._osf_V_low_init[adapter_name], keep=True)
        return left, values, right

    def initial_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_low0, S_low0, V_low0): the frozen low part of the SVD the adapter started from."""
        return (self._osf_U_low_init[adapter_name], self._osf_S_low_init[adapter_name],
                self._osf_V_low_init[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = U_low diag(S_low) V_low - U_low0 diag(S_low0) V_low0, (out, in), in the adapter dtype."""
        left, values, right = self.trained_factors(adapter_name)
        left0, values0, right0 = self.initial_factors(adapter_name)
        return torch.mm(left * values.unsqueeze(0), right) - torch.mm(left0 * values0.unsqueeze(0), right0)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W + delta_W, added in the wider of the two dtypes and stored in W's (as peft)."""
        delta = self.get_delta_weight(adapter_name).to(weight.device)
        return (weight + delta).to(weight.dtype), bias

    def unmerge(self) -> None:
        """peft's rule: the merged weights stay (warned); nothing merged warns "Already unmerged"."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        warnings.warn(UNMERGE_WARNING, stacklevel=2)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + b + [U_low S_low, -U_low0 S_low0] ([V_low; V_low0] x), for the first active adapter only.

        As peft: the base alone when adapters are disabled or merged (a merged layer stays merged).
        """
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged or not self._active_adapter:
            return result
        name = self._active_adapter[0]
        if name not in self.osf_svd_params:
            return result
        left, values, right = self.trained_factors(name)
        left0, values0, right0 = self.initial_factors(name)
        outer = torch.cat([left * values.unsqueeze(0), -(left0 * values0.unsqueeze(0))], dim=1)  # out x 2r
        inner = torch.cat([right, right0], dim=0)  # 2r x in
        hidden = x.to(outer.dtype) if self.cast_input_dtype_enabled else x
        update = F.linear(F.linear(hidden, inner), outer)
        return result + update.to(x.dtype)

    def __repr__(self) -> str:
        return "osf." + super().__repr__()


class Linear(OSFLayer):
    """OSF on a dense `nn.Linear`."""


def _is_dense_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) and base.weight.is_floating_point()


# ---------------------------------------------------------------------- dispatcher (OSFModel.dispatchers)
dispatch_linear = wraps(_is_dense_linear, Linear)
