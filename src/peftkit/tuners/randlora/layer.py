r"""RandLoRA layers: a full-rank update from the shared random bases, scaled by trained lambda and gamma.

With the shared bases `A` (r, 1, min) and `B` (max, n, r) (see `bases.py`), a layer with sides
min = min(in, out), max = max(in, out) and its own n = ceil(min / r) trains

    lambda: (r, n)              gamma: (n, min)

    S[i, b, :] = lambda[i, b] * A[i, 0, :min] * gamma[b, :]        (r, n, min) -> rows i*n + b
    U = B[:max, :n, :]                                            (max, n, r) -> columns b*r + i
    delta_W = scaling * U S  (max x min; transposed to (out, in) when in > out),  scaling = alpha / r

(the row order of S and the column order of U differ, as in peft). The forward applies the two
factors in turn, never forming delta_W. `init_weights` starts lambda at zero (a no-op) and gamma at
1 / max(n, min); otherwise lambda ~ N(0, 1) and gamma = 1 / max(in, out).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from .._core.base_layers import is_linear_like, is_transposed, linear_features, wraps
from ..vblora.shared import BufferDict, SharedTensorsLayer
from .bases import num_bases

BASIS_NAMES = ("randlora_A", "randlora_B")


class RandLoraLayer(SharedTensorsLayer, nn.Module):
    """A frozen Linear / Conv1D (or quantized linear) plus, per adapter, lambda and gamma over the shared bases."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("randlora_lambda", "randlora_gamma")
    other_param_names = ("randlora_A", "randlora_B", "randlora_dropout", "r", "scaling", "bases_per_adapter")
    shared_layer_names = BASIS_NAMES

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.bases_per_adapter: dict[str, int] = {}
        self.randlora_dropout = nn.ModuleDict({})
        self.randlora_lambda = nn.ParameterDict({})
        self.randlora_gamma = nn.ParameterDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    @property
    def num_bases(self) -> int:
        """The number of bases of the adapter added last (peft's attribute)."""
        return next(reversed(self.bases_per_adapter.values()))

    def update_layer(
        self, adapter_name: str, randlora_A: BufferDict, randlora_B: BufferDict, r: int, randlora_alpha: float,
        randlora_dropout: float = 0.0, init_weights: bool = True,
    ) -> None:
        """Add (or replace) `adapter_name`: lambda ~ N(0, 1), gamma = 1 / max(in, out), then `init_weights`."""
        self.r[adapter_name] = r
        self.randlora_dropout[adapter_name] = nn.Dropout(p=randlora_dropout) if randlora_dropout > 0 else nn.Identity()
        small, large = sorted((self.in_features, self.out_features))
        count = num_bases(small, r)
        self.bases_per_adapter[adapter_name] = count
        self.randlora_lambda[adapter_name] = nn.Parameter(torch.randn(r, count))
        self.randlora_gamma[adapter_name] = nn.Parameter(torch.ones(count, small) / large)
        self.scaling[adapter_name] = randlora_alpha / r
        self.share("randlora_A", randlora_A)
        self.share("randlora_B", randlora_B)
        if adapter_name not in randlora_A:
            self._borrow_bases(adapter_name, small, large, r)
        if init_weights:
            self.reset_randlora_parameters(adapter_name)
        self._move_adapter_to_base(adapter_name)
        self._move_bases_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _borrow_bases(self, adapter_name: str, small: int, large: int, r: int) -> None:
        """A later adapter uses the bases drawn for the first one (peft's rule), if they are large enough."""
        if not len(self.randlora_A):
            raise ConfigError("The `randlora_A` and `randlora_B` buffers are empty; add the adapter through the tuner.")
        basis_a, basis_b = next(iter(self.randlora_A.values())), next(iter(self.randlora_B.values()))
        too_small = (
            "{} has a size of {} but {} or greater is required; this probably happened because an additional RandLora "
            "adapter was added after the first one with incompatible shapes."
        )
        lower_rank = (
            "{} has a size of {} but {} or greater is required; this probably happened because an additional RandLora "
            "adapter with a lower rank was added after the first one; loading the adapters in reverse order may solve this."
        )
        if basis_b.shape[0] < large:
            raise ConfigError(too_small.format("randlora_B", basis_b.shape[0], large))
        if basis_a.shape[-1] < small:
            raise ConfigError(too_small.format("randlora_A", basis_a.shape[1], small))
        if basis_a.shape[0] < r:
            raise ConfigError(lower_rank.format("randlora_A", basis_a.shape[0], r))
        if basis_b.shape[-1] < r:
            raise ConfigError(lower_rank.format("randlora_B", basis_b.shape[-1], r))
        self.randlora_A[adapter_name] = basis_a
        self.randlora_B[adapter_name] = basis_b

    def _move_bases_to_base(self, adapter_name: str) -> None:
        """The shared bases take the base weight's device and float dtype (float32 over integer storage), as in peft."""
        weight = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.is_meta:
            return
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        for name in BASIS_NAMES:
            container = getattr(self, name)
            container[adapter_name] = container[adapter_name].to(weight.device, dtype)

    def reset_randlora_parameters(self, adapter_name: str) -> None:
        """lambda = 0 (a no-op adapter), gamma = 1 / max(n, min) (peft's default init)."""
        if adapter_name in self.randlora_lambda:
            with torch.no_grad():
                self.randlora_lambda[adapter_name].zero_()
                gamma = self.randlora_gamma[adapter_name]
                gamma.fill_(1 / max(gamma.shape))

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """lambda and gamma; with `save_projection` also the whole shared bases, under this layer (as peft)."""
        state = super().adapter_state(adapter_name, prefix)
        for name in BASIS_NAMES:
            container = getattr(self, name)
            if container.persistent and adapter_name in container:
                state[f"{prefix}.{name}"] = container[adapter_name]
        return state

    # ------------------------------------------------------------------ the update
    def get_scaled_bases(self, adapter_name: str, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second): the factors applied to x in turn, `delta_W = scaling * second @ first` (out, in)."""
        basis_a, basis_b = self.randlora_A[adapter_name], self.randlora_B[adapter_name]
        device = basis_b.device if device is None else device
        lam = self.randlora_lambda[adapter_name].to(device)
        gamma = self.randlora_gamma[adapter_name].to(device)
        if device.type == "cpu" and basis_b.dtype in (torch.float16, torch.bfloat16):
            basis_a, basis_b, lam, gamma = basis_a.float(), basis_b.float(), lam.float(), gamma.float()
        small, large = sorted((self.in_features, self.out_features))
        count = self.bases_per_adapter[adapter_name]
        sliced_a = basis_a[:, :count, :small].to(device)
        sliced_b = basis_b[:large, :count, :].to(device)
        scaled = (lam[:, :, None] * sliced_a * gamma[None]).flatten(end_dim=1)  # (r * n, small)
        spread = sliced_b.flatten(start_dim=1)  # (large, n * r)
        if small == self.in_features:
            return scaled, spread
        return spread.T, scaled.T

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = scaling * second @ first, laid out like the base weight (transposed for Conv1D)."""
        first, second = self.get_scaled_bases(adapter_name)
        delta = second @ first
        delta = delta.T if self.fan_in_fan_out else delta
        return delta * self.scaling[adapter_name]

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`scaling * second(first(dropout(x)))`, the scaled shared random bases."""
        first, second = self.get_scaled_bases(adapter_name, device=x.device)
        inputs = self.randlora_dropout[adapter_name](x.to(second.dtype))
        return F.linear(F.linear(inputs, first), second) * self.scaling[adapter_name]

    def __repr__(self) -> str:
        return "randlora." + super().__repr__()


#: nn.Linear, transformers' Conv1D and quantized linear layers (peft: also bitsandbytes' 8-/4-bit).
dispatch_linear = wraps(is_linear_like, RandLoraLayer)
