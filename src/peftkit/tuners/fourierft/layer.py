r"""FourierFT layers: the update is the real part of the inverse 2-D DFT of a sparse spectrum.

An adapter holds n trained coefficients s (`fourierft_spectrum`) at n fixed, distinct random
frequencies (u_k, v_k) of the (out x in) spectrum; everything else of the spectrum is zero:

    S[u_k, v_k] = s_k                                      (u, v: `indices`, from random_loc_seed)
    delta_W = scaling * Re(ifft2(S))                       (out x in)
    delta_W[a, b] = scaling / (out * in) * sum_k s_k cos(2 pi (a u_k / out + b v_k / in))

    y = W x + delta_W x

The locations are those peft draws -- the first n of `randperm(out * in)` from a CPU generator
seeded with `random_loc_seed`, read row-major as (u, v) -- so a checkpoint (only the coefficients)
reloads the same update in either library. `init_weights=False` (the default) draws s ~ N(0, 1):
a new adapter is not a no-op; True starts s at zero.

Two ways to apply the update, equal up to rounding:

- materialised (peft's): build delta_W with one ifft2, then `F.linear(x, delta_W)`; in x out
  multiply-adds per input row;
- spectral: never form delta_W. With X = ifft(x) along the input (length in),

      Z[u] = sum_{k: u_k = u} s_k X[v_k]                    (a scatter of n values)
      delta_W x = scaling * Re(ifft(Z))                     (length out; the 1 / (out * in) is in the iffts)

  i.e. about 5 (in log in + out log out) + n operations per row instead of in x out.

`delta_mode="auto"` picks the cheaper per call (counting the backward when autograd is on);
"spectral" / "materialized" force one (tests and benchmarks).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from .._core.base_layers import is_transposed, linear_features, wraps
from .._core.layer import BaseTunerLayer

DELTA_MODES = ("auto", "spectral", "materialized")
SUPPORTED_LAYERS = "`torch.nn.Linear` and transformers' `Conv1D`"


@lru_cache(maxsize=64)
def _random_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    indices = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([indices // in_features, indices % in_features], dim=0)


def random_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """(2, n) long tensor of (row, column) positions: peft's draw (the first n of a seeded CPU randperm).

    Cached by shape and seed (layers of one shape share a draw); a copy is returned, so callers own it.
    """
    return _random_locations(out_features, in_features, n_frequency, seed).clone()


def check_n_frequency(n_frequency: int, in_features: int, out_features: int) -> None:
    """peft's checks (ValueError): 0 < n_frequency <= in_features * out_features."""
    if n_frequency <= 0:
        raise ConfigError(f"`n_frequency` should be a positive integer value but the value passed is {n_frequency}")
    if n_frequency > in_features * out_features:
        raise ConfigError(
            f"`n_frequency` should be less than or equal to the product of the input and output dimensions "
            f"but the value passed is {n_frequency} and the product is {in_features * out_features}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs and small-float inputs: fp16 / bf16 compute in fp32 (as peft), fp32 / fp64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


#: How many matmul operations one counted FFT operation costs (torch on CPU: FFTs are far less tuned
#: than GEMM). 6 makes `auto` pick the faster path for the bench's 512x512 / 512x1376 / 1376x512 layers.
FFT_OPERATION_COST = 6


class FourierFTLayer(BaseTunerLayer, nn.Module):
    """A frozen `nn.Linear` / `Conv1D` plus, per adapter, n spectral coefficients at fixed frequencies."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed", "indices")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.delta_mode = "auto"
        self.fourierft_spectrum = nn.ParameterDict({})
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        #: adapter -> (2, n) CPU long tensor of (row, column) locations, as peft keeps it.
        self.indices: dict[str, torch.Tensor] = {}
        self._indices_on: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        n_frequency: int,
        scaling: float = 150.0,
        random_loc_seed: int = 777,
        init_weights: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: s ~ N(0, 1), or zeros with `init_weights=True`."""
        check_n_frequency(n_frequency, self.in_features, self.out_features)
        self.fourierft_n_frequency[adapter_name] = n_frequency
        self.fourierft_random_loc_seed[adapter_name] = random_loc_seed
        self.fourierft_scaling[adapter_name] = scaling
        self.indices[adapter_name] = random_locations(self.out_features, self.in_features, n_frequency, random_loc_seed)
        self._forget_indices(adapter_name)
        # Drawn even when zeroed next, so the global RNG advances exactly as in peft.
        self.fourierft_spectrum[adapter_name] = nn.Parameter(torch.randn(n_frequency))
        if init_weights:
            self.reset_fourier_parameters(adapter_name)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    @torch.no_grad()
    def reset_fourier_parameters(self, adapter_name: str) -> None:
        """Zero the adapter's coefficients (peft's name): the adapter becomes a no-op."""
        if adapter_name in self.fourierft_spectrum:
            nn.init.zeros_(self.fourierft_spectrum[adapter_name])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_indices(adapter_name)

    def _forget_indices(self, adapter_name: str) -> None:
        for key in [key for key in self._indices_on if key[0] == adapter_name]:
            del self._indices_on[key]

    def indices_on(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        """The adapter's locations on `device`, copied there once (peft copies them on every call)."""
        key = (adapter_name, device)
        found = self._indices_on.get(key)
        if found is None:
            found = self._indices_on[key] = self.indices[adapter_name].to(device)
        return found

    # ------------------------------------------------------------------ the update
    def _delta(self, adapter_name: str) -> torch.Tensor:
        """scaling * Re(ifft2(S)), (out, in), in the compute dtype (fp32 for fp16 / bf16 spectra)."""
        spectrum = self.fourierft_spectrum[adapter_name]
        rows, cols = self.indices_on(adapter_name, spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device, dtype=compute_dtype(spectrum.dtype))
        dense = dense.index_put((rows, cols), spectrum.to(dense.dtype))
        return torch.fft.ifft2(dense).real * self.fourierft_scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W in the spectrum's dtype, laid out like the base weight (transposed for Conv1D)."""
        delta = self._delta(adapter_name).to(self.fourierft_spectrum[adapter_name].dtype)
        return delta.T if self.fan_in_fan_out else delta

    def _spectral_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """delta_W x without forming delta_W (see the module docstring); x in the compute dtype."""
        spectrum = self.fourierft_spectrum[adapter_name]
        rows, cols = self.indices_on(adapter_name, x.device)
        picked = torch.fft.ifft(x, dim=-1).index_select(-1, cols) * spectrum.to(x.dtype)
        gathered = torch.zeros(*x.shape[:-1], self.out_features, dtype=picked.dtype, device=x.device)
        gathered = gathered.index_add(-1, rows, picked)
        return torch.fft.ifft(gathered, dim=-1).real * self.fourierft_scaling[adapter_name]

    def _path(self, x: torch.Tensor, adapter_name: str) -> str:
        """"spectral" or "materialized": the forced `delta_mode`, or the cheaper by a rough count."""
        mode = self.delta_mode
        if mode not in DELTA_MODES:
            raise ValueError(f"delta_mode={mode!r} is not one of {DELTA_MODES}.")
        if mode != "auto":
            return mode
        positions = x.numel() // max(self.in_features, 1)
        size = self.in_features * self.out_features
        build = 5 * size * math.log2(max(size, 2))
        # complex FFTs of both lengths, about 5 N log N real operations each, plus the scatter; an FFT
        # operation costs about FFT_OPERATION_COST matmul operations (measured on CPU, bench/RESULTS.md)
        per_row = FFT_OPERATION_COST * 5 * (self.in_features * math.log2(max(self.in_features, 2)) + self.out_features * math.log2(max(self.out_features, 2)))
        per_row += 4 * self.fourierft_n_frequency[adapter_name]
        backward = 2 if torch.is_grad_enabled() else 0
        materialized = build * (1 + backward / 2) + positions * size * (1 + backward)
        spectral = positions * per_row * (1 + backward)
        return "spectral" if spectral < materialized else "materialized"

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """delta_W x (no bias), by the cheaper path; result in x's compute dtype."""
        x = x.to(compute_dtype(self.fourierft_spectrum[adapter_name].dtype))
        if self._path(x, adapter_name) == "spectral":
            return self._spectral_output(x, adapter_name)
        return F.linear(x, self._delta(adapter_name).to(x.dtype))

    def __repr__(self) -> str:
        return "fourierft." + super().__repr__()


class FourierFTLinear(FourierFTLayer):
    """FourierFT over an `nn.Linear` or a transformers `Conv1D` (peft's class name)."""


#: nn.Linear and transformers' Conv1D (peft's FourierFT has no quantized or conv layers).
dispatch_linear = wraps((nn.Linear, Conv1D), FourierFTLinear)
