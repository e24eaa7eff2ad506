r"""Uni-LoRA layers: every entry of a layer's LoRA factors is one (scaled) entry of a shared vector.

Each adapter trains a single vector `theta_d` (length d, held by the tuner and shared by all its
layers, see `vblora/shared.py`). A layer with in/out features n/m holds fixed integer indices and
scales (buffers, assigned once by the tuner):

    indices_A, scales_A: (r, n)          indices_B, scales_B: (m, r)

    A = theta_d[indices_A] * scales_A     B = theta_d[indices_B] * scales_B
    y = W x + B A dropout(x)              delta_W = B A  (no further scaling)

The tuner assigns the indices over *all* the adapter's layers at once: a balanced shuffle in
which each of the d entries is used floor(D/d) or ceil(D/d) times (D = the model's LoRA entries),
and scales = 1/sqrt(uses of that entry), so every entry of theta_d has the same total weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.base_layers import is_transposed, linear_features, wraps
from ..vblora.shared import BufferDict, SharedTensorsLayer

INDEX_NAMES = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


class UniLoraLayer(SharedTensorsLayer, nn.Module):
    """A frozen Linear / Conv1D plus, per adapter, fixed indices and scales into the tuner's `theta_d`."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("unilora_theta_d",)
    other_param_names = ("r", *INDEX_NAMES, "unilora_dropout")
    shared_layer_names = ("unilora_theta_d",)
    presence_names = ("r",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.r: dict[str, int] = {}
        self.unilora_dropout = nn.ModuleDict({})
        for name in INDEX_NAMES:
            setattr(self, name, BufferDict(persistent=True))
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(
        self, adapter_name: str, unilora_theta_d: nn.ParameterDict, r: int, unilora_dropout: float = 0.0,
        save_indices: bool = False,
    ) -> None:
        """Add (or replace) `adapter_name`; its indices are placeholders until the tuner assigns them."""
        self.r[adapter_name] = r
        for name in INDEX_NAMES:  # peft: the last adapter added decides what the state dict holds
            getattr(self, name).persistent = save_indices
        self.unilora_dropout[adapter_name] = nn.Dropout(p=unilora_dropout) if unilora_dropout > 0 else nn.Identity()
        self.share("unilora_theta_d", unilora_theta_d)
        length = unilora_theta_d[adapter_name].numel()
        device = self._base_device()
        # Drawn as peft draws them (its RNG use is kept), then replaced by the tuner's assignment.
        self.unilora_indices_A[adapter_name] = torch.randint(0, length, (r, self.in_features)).to(device)
        self.unilora_indices_B[adapter_name] = torch.randint(0, length, (self.out_features, r)).to(device)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _base_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else torch.device("cpu")

    def assign(self, adapter_name: str, indices_a: torch.Tensor, indices_b: torch.Tensor, inv_sqrt_counts: torch.Tensor) -> None:
        """Set the adapter's indices and their scales (1/sqrt(uses of each theta_d entry))."""
        weight = getattr(self.get_base_layer(), "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        device = self._base_device()
        self.unilora_indices_A[adapter_name] = indices_a.to(device)
        self.unilora_indices_B[adapter_name] = indices_b.to(device)
        self.unilora_scales_A[adapter_name] = inv_sqrt_counts[indices_a].to(device, dtype)
        self.unilora_scales_B[adapter_name] = inv_sqrt_counts[indices_b].to(device, dtype)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint keys: the indices and scales when they are saved (`save_indices`); theta_d is the tuner's."""
        state = super().adapter_state(adapter_name, prefix)
        for name in INDEX_NAMES:
            container = getattr(self, name)
            if container.persistent and adapter_name in container:
                state[f"{prefix}.{name}"] = container[adapter_name]
        return state

    # ------------------------------------------------------------------ the update
    def _get_lora_matrices(self, adapter_name: str, cast_to_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of `adapter_name`, gathered from theta_d."""
        indices_a = self.unilora_indices_A[adapter_name]
        theta = self.unilora_theta_d[adapter_name].to(indices_a.device)
        scales_a = self.unilora_scales_A[adapter_name].to(indices_a.device)
        scales_b = self.unilora_scales_B[adapter_name].to(indices_a.device)
        if cast_to_fp32:
            theta, scales_a, scales_b = theta.float(), scales_a.float(), scales_b.float()
        a = theta[indices_a] * scales_a
        b = theta[self.unilora_indices_B[adapter_name].to(indices_a.device)] * scales_b
        return a, b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = B A, laid out like the base weight (transposed for Conv1D)."""
        theta = self.unilora_theta_d[adapter_name]
        half_on_cpu = theta.device.type == "cpu" and theta.dtype in (torch.float16, torch.bfloat16)
        a, b = self._get_lora_matrices(adapter_name, cast_to_fp32=half_on_cpu)
        delta = b @ a
        return (delta.T if self.fan_in_fan_out else delta).to(theta.dtype)

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`B A dropout(x)`, with A and B gathered from the shared theta by the adapter's indices."""
        a, b = self._get_lora_matrices(adapter_name)
        inputs = self.unilora_dropout[adapter_name](x.to(self.unilora_theta_d[adapter_name].dtype))
        return F.linear(F.linear(inputs, a), b)

    def __repr__(self) -> str:
        return "unilora." + super().__repr__()


#: nn.Linear and transformers' Conv1D (what peft's Uni-LoRA wraps).
dispatch_linear = wraps((nn.Linear, Conv1D), UniLoraLayer)
