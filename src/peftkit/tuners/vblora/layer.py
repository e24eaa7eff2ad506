r"""VB-LoRA layers: LoRA factors whose sub-vectors are top-k mixtures of one shared vector bank.

Every adapter has one bank `V` (num_vectors x L, L = vector_length) shared by all its layers (held
by the tuner, see `shared.py`). A layer with in/out features `n`/`m` (multiples of L) keeps only
logits:

    logits_A: (r, n/L, num_vectors)        logits_B: (m/L, r, num_vectors)

Each logit row picks its top-k bank vectors and mixes them with the softmax of their logits:

    mix(l) = sum_{j in topk(l)} softmax(l_topk)_j * V[j]                    (a length-L vector)

    A = [mix(logits_A[i, t]) for t] -> (r, n)        row i: n/L sub-vectors side by side
    B = [mix(logits_B[s, i]) for s] -> (m, r)        column i: m/L sub-vectors stacked

    y = W x + B A dropout(x)                     delta_W = B A  (no scaling)

The forward multiplies x by A then B (never forming delta_W); merging forms `B A`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from .._core.base_layers import is_transposed, linear_features, wraps
from .shared import SharedTensorsLayer

#: Stands for -inf in logits rebuilt from a top-k checkpoint (peftkit refuses non-finite checkpoint values).
MASKED_LOGIT = torch.finfo(torch.float32).min


def mix_bank(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """`(..., num_vectors)` logits -> `(..., L)`: the softmax-weighted sum of each row's top-k bank vectors."""
    top_logits, indices = logits.topk(topk, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)
    return torch.einsum("...k,...kl->...l", weights, bank[indices])


class VBLoRALayer(SharedTensorsLayer, nn.Module):
    """A frozen Linear / Conv1D plus, per adapter, top-k logits over the tuner's shared vector bank."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")
    other_param_names = ("r", "topk", "vblora_dropout")
    shared_layer_names = ("vblora_vector_bank",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.vblora_dropout = nn.ModuleDict({})
        self.vblora_logits_A = nn.ParameterDict({})
        self.vblora_logits_B = nn.ParameterDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        vblora_vector_bank: nn.ParameterDict,
        r: int,
        topk: int,
        num_vectors: int,
        vector_length: int,
        vblora_dropout: float = 0.0,
        init_logits_std: float = 0.1,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: logits ~ N(0, init_logits_std), over the shared bank."""
        for features, side in ((self.in_features, "in_features"), (self.out_features, "out_features")):
            if features % vector_length:
                raise ConfigError(f"`{side}` {features} must be divisible by `vector_length` {vector_length}")
        self.r[adapter_name] = r
        self.topk[adapter_name] = topk
        self.vblora_dropout[adapter_name] = nn.Dropout(p=vblora_dropout) if vblora_dropout > 0 else nn.Identity()
        self.share("vblora_vector_bank", vblora_vector_bank)
        logits_a = torch.zeros(r, self.in_features // vector_length, num_vectors)
        logits_b = torch.zeros(self.out_features // vector_length, r, num_vectors)
        with torch.no_grad():  # drawn in peft's order: A, then B
            logits_a.normal_(0, init_logits_std)
            logits_b.normal_(0, init_logits_std)
        self.vblora_logits_A[adapter_name] = nn.Parameter(logits_a)
        self.vblora_logits_B[adapter_name] = nn.Parameter(logits_b)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_vblora_logits(self, adapter_name: str, init_logits_std: float) -> None:
        """Redraw the adapter's logits from N(0, init_logits_std) (peft's name)."""
        if adapter_name in self.vblora_logits_A:
            with torch.no_grad():
                self.vblora_logits_A[adapter_name].normal_(0, init_logits_std)
                self.vblora_logits_B[adapter_name].normal_(0, init_logits_std)

    # ------------------------------------------------------------------ the update
    def _get_lora_matrices(self, adapter_name: str, cast_to_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of `adapter_name`, mixed from the bank."""
        logits_a = self.vblora_logits_A[adapter_name]
        logits_b = self.vblora_logits_B[adapter_name]
        if self.training and bool((logits_a[0, 0] <= MASKED_LOGIT).any()):
            raise RuntimeError(
                "Found infinity values in VB-LoRA logits. Ensure training was not resumed from a "
                "`save_only_topk_weights` model: such adapters keep only the top-k logits and serve inference only."
            )
        bank = self.vblora_vector_bank[adapter_name].to(logits_a.device)
        if cast_to_fp32:
            logits_a, logits_b, bank = logits_a.float(), logits_b.float(), bank.float()
        topk = self.topk[adapter_name]
        a = mix_bank(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
        b = mix_bank(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return a, b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = B A, laid out like the base weight (transposed for Conv1D)."""
        logits = self.vblora_logits_A[adapter_name]
        half_on_cpu = logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16)
        a, b = self._get_lora_matrices(adapter_name, cast_to_fp32=half_on_cpu)
        delta = b @ a
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(logits.dtype)

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`B A dropout(x)`, with A and B mixed from the bank by the adapter's top-k logits."""
        a, b = self._get_lora_matrices(adapter_name)
        return F.linear(F.linear(self.vblora_dropout[adapter_name](x.to(a.dtype)), a), b)

    def __repr__(self) -> str:
        return "vblora." + super().__repr__()


#: nn.Linear and transformers' Conv1D (peft's VB-LoRA has no quantized or conv layers).
dispatch_linear = wraps((nn.Linear, Conv1D), VBLoRALayer)
