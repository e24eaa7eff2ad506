r"""WaveFT layers: the update is the inverse wavelet transform of a sparse coefficient matrix.

An adapter holds n trained coefficients s (`waveft_spectrum`) at n fixed, distinct random
positions (u_k, v_k) of the (out x in) grid (`waveft_indices`, drawn as peft draws them from
`random_loc_seed`). With `use_idwt` (the default) the grid is centred in peft's padded (H x W)
coefficient matrix S and

    delta_W = scaling * IDWT2(S)          (one level, `wavelet_family`; see wavelets.py)
            = scaling * R P C^T           P: S with swapped off-diagonal quadrants, n non-zeros

without it `delta_W = scaling * S` (the coefficients are delta_W's entries).

    y = W x + delta_W x

`init_weights=True` (the default) starts s at zero (a no-op); False draws s ~ N(0, 0.01^2).

Two ways to apply the update, equal up to rounding:

- materialised (peft's): build delta_W (two 1-D synthesis passes over the padded matrix), then
  `F.linear(x, delta_W)`: in x out multiply-adds per input row;
- factored: never form delta_W. Per row, `w = C^T x` (a strided conv1d, about L * in), the n
  coefficients scatter `w` into `z = P w`, and `R z` (a transposed conv1d, about L * out):
  about 2 L (in + out) + 2 n operations. Without the IDWT it is a gather and a scatter of n.

`delta_mode="auto"` picks the cheaper per call (counting the backward when autograd is on);
"factored" / "materialized" force one (tests and benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.base_layers import is_transposed, linear_features, wraps
from .._core.layer import BaseTunerLayer
from ..fourierft.layer import SUPPORTED_LAYERS, check_n_frequency, compute_dtype, random_locations
from .wavelets import Axis, analyze, filter_length, reconstruct, swapped_positions, synthesis_filters, synthesize

DELTA_MODES = ("auto", "factored", "materialized")

__all__ = ["SUPPORTED_LAYERS", "WaveFTLayer", "WaveFTLinear", "dispatch_linear"]


class WaveFTLayer(BaseTunerLayer, nn.Module):
    """A frozen `nn.Linear` / `Conv1D` plus, per adapter, n wavelet coefficients at fixed positions."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("waveft_spectrum",)
    other_param_names = (
        "waveft_n_frequency",
        "waveft_scaling",
        "waveft_random_loc_seed",
        "waveft_wavelet_family",
        "waveft_indices",
        "waveft_use_idwt",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.delta_mode = "auto"
        self.waveft_spectrum = nn.ParameterDict({})
        self.waveft_n_frequency: dict[str, int] = {}
        self.waveft_scaling: dict[str, float] = {}
        self.waveft_random_loc_seed: dict[str, int] = {}
        self.waveft_wavelet_family: dict[str, str] = {}
        #: adapter -> (2, n) CPU long tensor of (row, column) grid positions, as peft keeps it.
        self.waveft_indices: dict[str, torch.Tensor] = {}
        self.waveft_use_idwt: dict[str, bool] = {}
        self._plans: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        n_frequency: int,
        scaling: float = 25.0,
        wavelet_family: str = "db1",
        use_idwt: bool = True,
        random_loc_seed: int = 777,
        init_weights: bool = True,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: zero coefficients, or N(0, 0.01^2) with `init_weights=False`."""
        check_n_frequency(n_frequency, self.in_features, self.out_features)
        self.waveft_n_frequency[adapter_name] = n_frequency
        self.waveft_random_loc_seed[adapter_name] = random_loc_seed
        self.waveft_wavelet_family[adapter_name] = wavelet_family
        self.waveft_use_idwt[adapter_name] = use_idwt
        self.waveft_scaling[adapter_name] = scaling
        self.waveft_indices[adapter_name] = random_locations(self.out_features, self.in_features, n_frequency, random_loc_seed)
        self._forget_plans(adapter_name)
        if init_weights:  # as peft: no random draw
            self.waveft_spectrum[adapter_name] = nn.Parameter(torch.zeros(n_frequency))
        else:
            self.waveft_spectrum[adapter_name] = nn.Parameter(torch.randn(n_frequency) * 0.01)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    @torch.no_grad()
    def reset_wave_parameters(self, adapter_name: str) -> None:
        """Zero the adapter's coefficients (peft's name): the adapter becomes a no-op."""
        if adapter_name in self.waveft_spectrum:
            nn.init.zeros_(self.waveft_spectrum[adapter_name])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_plans(adapter_name)

    def _forget_plans(self, adapter_name: str) -> None:
        for key in [key for key in self._plans if key[0] == adapter_name]:
            del self._plans[key]

    # ------------------------------------------------------------------ geometry, cached per device
    def _axes(self, adapter_name: str) -> tuple[Axis, Axis]:
        length = filter_length(self.waveft_wavelet_family[adapter_name])
        return Axis.of(self.out_features, length), Axis.of(self.in_features, length)

    def _plan(self, adapter_name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(rows, cols[, filters]) on `device`: grid positions (no IDWT) or positions in P and the filters."""
        key = (adapter_name, device, dtype)
        plan = self._plans.get(key)
        if plan is None:
            rows, cols = self.waveft_indices[adapter_name]
            if self.waveft_use_idwt[adapter_name]:
                rows, cols = swapped_positions(rows, cols, *self._axes(adapter_name))
                filters = synthesis_filters(self.waveft_wavelet_family[adapter_name], dtype, device)
                plan = (rows.to(device), cols.to(device), filters)
            else:
                plan = (rows.to(device), cols.to(device))
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ the update
    def _delta(self, adapter_name: str) -> torch.Tensor:
        """delta_W (out, in) in the compute dtype (fp32 for fp16 / bf16 coefficients)."""
        spectrum = self.waveft_spectrum[adapter_name]
        dtype = compute_dtype(spectrum.dtype)
        values = spectrum.to(dtype) * self.waveft_scaling[adapter_name]
        plan = self._plan(adapter_name, spectrum.device, dtype)
        if not self.waveft_use_idwt[adapter_name]:
            dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device, dtype=dtype)
            return dense.index_put(plan, values)
        row_axis, col_axis = self._axes(adapter_name)
        rows, cols, filters = plan
        dense = torch.zeros(row_axis.coefficients, col_axis.coefficients, device=spectrum.device, dtype=dtype)
        return reconstruct(dense.index_put((rows, cols), values), filters, row_axis, col_axis)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W in the coefficients' dtype, laid out like the base weight (transposed for Conv1D)."""
        delta = self._delta(adapter_name).to(self.waveft_spectrum[adapter_name].dtype)
        return delta.T if self.fan_in_fan_out else delta

    def _factored_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """delta_W x without forming delta_W (see the module docstring); x in the compute dtype."""
        values = self.waveft_spectrum[adapter_name].to(x.dtype) * self.waveft_scaling[adapter_name]
        plan = self._plan(adapter_name, x.device, x.dtype)
        if not self.waveft_use_idwt[adapter_name]:
            rows, cols = plan
            picked = x.index_select(-1, cols) * values
            return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device).index_add(-1, rows, picked)
        row_axis, col_axis = self._axes(adapter_name)
        rows, cols, filters = plan
        picked = analyze(x, filters, col_axis).index_select(-1, cols) * values
        z = torch.zeros(*x.shape[:-1], row_axis.coefficients, dtype=x.dtype, device=x.device).index_add(-1, rows, picked)
        return synthesize(z, filters, row_axis)

    def _path(self, x: torch.Tensor, adapter_name: str) -> str:
        """"factored" or "materialized": the forced `delta_mode`, or the cheaper by a rough count."""
        mode = self.delta_mode
        if mode not in DELTA_MODES:
            raise ValueError(f"delta_mode={mode!r} is not one of {DELTA_MODES}.")
        if mode != "auto":
            return mode
        positions = x.numel() // max(self.in_features, 1)
        size = self.in_features * self.out_features
        scatter = 3 * self.waveft_n_frequency[adapter_name]
        if self.waveft_use_idwt[adapter_name]:
            row_axis, col_axis = self._axes(adapter_name)
            length = filter_length(self.waveft_wavelet_family[adapter_name])
            per_row = 2 * length * (row_axis.coefficients + col_axis.coefficients) + scatter
            build = 2 * length * (row_axis.coefficients * col_axis.coefficients) + size
        else:
            per_row, build = scatter, size
        backward = 2 if torch.is_grad_enabled() else 0
        materialized = build * (1 + backward / 2) + positions * size * (1 + backward)
        factored = positions * per_row * (1 + backward) + 64  # a few small kernel launches
        return "factored" if factored < materialized else "materialized"

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """delta_W x (no bias), by the cheaper path; result in the compute dtype."""
        x = x.to(compute_dtype(self.waveft_spectrum[adapter_name].dtype))
        if self._path(x, adapter_name) == "factored":
            return self._factored_output(x, adapter_name)
        return F.linear(x, self._delta(adapter_name))

    def __repr__(self) -> str:
        return "waveft." + super().__repr__()


class WaveFTLinear(WaveFTLayer):
    """WaveFT over an `nn.Linear` or a transformers `Conv1D` (peft's class name)."""


#: nn.Linear and transformers' Conv1D (peft's WaveFT has no quantized or conv layers).
dispatch_linear = wraps((nn.Linear, Conv1D), WaveFTLinear)
