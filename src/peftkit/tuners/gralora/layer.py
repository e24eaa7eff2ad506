r"""GraLoRA layers: a LoRA per block of a k x k grid over the frozen weight.

x is cut into k pieces x_1 .. x_k (in / k each), y into k pieces y_1 .. y_k (out / k each). Each
input block n has A_n (in/k x r), each output block j has B_j (r x out/k); with s = r / k, A_n's
columns and B_j's rows are cut into k chunks of s:

    A_n = [ A_n^1 | ... | A_n^k ]          B_j = [ B_j^1 ; ... ; B_j^k ]       (chunks of s)

    delta_W block (j, n) = (A_n^j B_j^n)^T          (out/k x in/k, rank s)

    y_j = W_j x + b_j + scaling * sum_n (x_n A_n^j) B_j^n
    scaling = alpha / (r + hybrid_r)

so the k^2 blocks each have rank r / k: the parameters of a rank-r LoRA, the update up to rank
k * r. Saved as `gralora_A` (k, in/k, r) and `gralora_B` (k, r, out/k). Hybrid GraLoRA
(`hybrid_r` > 0) adds a plain LoRA over the whole weight, `scaling * B_h A_h x`, saved as
`gralora_A_general.weight` (hybrid_r x in) and `gralora_B_general.weight` (out x hybrid_r).

Initialisation: A (and A_h) Kaiming-uniform, B (and B_h) zero -- a no-op; `init_weights=False`
draws B Kaiming-uniform too. The draws are peft's, in peft's order, so a seed gives the same adapter.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import base_of, is_linear_like, is_transposed, linear_features
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D` and quantized linear layers"


def block_update(x: torch.Tensor, gralora_A: torch.Tensor, gralora_B: torch.Tensor) -> torch.Tensor:
    """`sum_n (x_n A_n^j) B_j^n` for every output block j: x (..., in) -> (..., out), no dense delta_W."""
    k, _, r = gralora_A.shape
    lead = x.shape[:-1]
    per_input = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, -1), gralora_A)  # x_n A_n
    # chunk j of every x_n A_n, side by side: the r inputs of output block j
    per_output = per_input.reshape(*lead, k, k, r // k).transpose(-3, -2).reshape(*lead, k, r)
    return torch.einsum("...jr,jro->...jo", per_output, gralora_B).reshape(*lead, -1)


def block_delta_weight(gralora_A: torch.Tensor, gralora_B: torch.Tensor) -> torch.Tensor:
    """delta_W (out x in) before scaling: block (j, n) = (A_n^j B_j^n)^T."""
    k, in_block, r = gralora_A.shape
    out_block = gralora_B.shape[-1]
    s = r // k
    chunks_a = gralora_A.reshape(k, in_block, k, s)  # [n, i, j, s]
    chunks_b = gralora_B.reshape(k, k, s, out_block)  # [j, n, s, o]
    delta = torch.einsum("nijs,jnso->joni", chunks_a, chunks_b)
    return delta.reshape(k * out_block, k * in_block)


class GraloraLayer(BaseTunerLayer, nn.Module):
    """What every GraLoRA layer holds: per adapter the block factors, the hybrid LoRA, rank, scale, dropout."""

    adapter_layer_names = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")
    other_param_names = ("r", "hybrid_r", "alpha", "scaling", "gralora_dropout", "gralora_k")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.gralora_k: dict[str, int] = {}
        self.hybrid_r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.gralora_dropout = nn.ModuleDict({})
        self.gralora_A = nn.ParameterDict({})
        self.gralora_B = nn.ParameterDict({})
        self.gralora_A_general = nn.ModuleDict({})
        self.gralora_B_general = nn.ModuleDict({})
        base = self.get_base_layer()
        self.fan_in_fan_out = is_transposed(base)
        self.in_features, self.out_features = linear_features(base)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float = 64,
        gralora_k: int = 2,
        hybrid_r: int = 0,
        gralora_dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: k block factors A, B (and the hybrid LoRA when hybrid_r > 0)."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        if hybrid_r < 0:
            raise ConfigError(f"`hybrid_r` should be a non-negative integer value but the value passed is {hybrid_r}")
        for name, features in (("in_features", self.in_features), ("out_features", self.out_features)):
            if features % gralora_k != 0:
                raise ConfigError(
                    f"{name} should be divisible by gralora_k, but got {features} and {gralora_k}; "
                    "choose a gralora_k that divides both sizes of every target (or narrow target_modules)."
                )
        factor_a, factor_b = self._draw_blocks(r, gralora_k, init_weights)
        general_a, general_b = self._draw_hybrid(hybrid_r, init_weights)
        # peft casts new adapters to a float base's dtype, then (autocast) back to float32: same rounding.
        base_dtype = getattr(getattr(self.get_base_layer(), "weight", None), "dtype", None)
        if isinstance(base_dtype, torch.dtype) and base_dtype.is_floating_point:
            factor_a, factor_b = (t.to(base_dtype).to(torch.float32) for t in (factor_a, factor_b))
            for module in (general_a, general_b):
                module.to(base_dtype).to(torch.float32)
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.gralora_k[adapter_name] = gralora_k
        self.hybrid_r[adapter_name] = hybrid_r
        self.scaling[adapter_name] = alpha / (r + hybrid_r)
        self.gralora_dropout[adapter_name] = nn.Dropout(p=gralora_dropout) if gralora_dropout > 0.0 else nn.Identity()
        self.gralora_A[adapter_name] = nn.Parameter(factor_a)
        self.gralora_B[adapter_name] = nn.Parameter(factor_b)
        self.gralora_A_general[adapter_name] = general_a
        self.gralora_B_general[adapter_name] = general_b
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _draw_blocks(self, r: int, k: int, init_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A (k, in/k, r), B (k, r, out/k), drawn block by block as peft draws them (A_n, then B_n)."""
        blocks_a, blocks_b = [], []
        for _ in range(k):
            block_a = torch.empty(r, self.in_features // k)
            block_b = torch.empty(self.out_features // k, r)
            nn.init.kaiming_uniform_(block_a, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(block_b)
            else:
                nn.init.kaiming_uniform_(block_b, a=math.sqrt(5))
            blocks_a.append(block_a)
            blocks_b.append(block_b)
        factor_a = torch.stack(blocks_a).transpose(1, 2).contiguous()
        factor_b = torch.stack(blocks_b).transpose(1, 2).contiguous()
        return factor_a, factor_b

    def _draw_hybrid(self, hybrid_r: int, init_weights: bool) -> tuple[nn.Module, nn.Module]:
        """The hybrid LoRA's A (hybrid_r x in) and B (out x hybrid_r) as bias-free linears; identities when 0."""
        if hybrid_r == 0:
            return nn.Identity(), nn.Identity()
        # nn.Linear draws its own init before ours: kept, so that a seed gives peft's tensors.
        general_a = nn.Linear(self.in_features, hybrid_r, bias=False)
        general_b = nn.Linear(hybrid_r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(general_a.weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(general_b.weight)
        else:
            nn.init.kaiming_uniform_(general_b.weight, a=math.sqrt(5))
        return general_a, general_b

    # ------------------------------------------------------------------ forward (additive)
    def delta_terms(self, x: torch.Tensor, adapter_name: str) -> list[torch.Tensor]:
        """The adapter's unscaled terms in its dtype: `block_update(x)` and, with hybrid_r > 0, `B_h A_h x`.

        As peft, the hybrid LoRA draws its own dropout mask.
        """
        factor_a = self.gralora_A[adapter_name]
        dropout = self.gralora_dropout[adapter_name]
        inputs = x.to(factor_a.dtype)
        terms = [block_update(dropout(inputs), factor_a, self.gralora_B[adapter_name])]
        if self.hybrid_r[adapter_name] > 0:
            terms.append(self.gralora_B_general[adapter_name](self.gralora_A_general[adapter_name](dropout(inputs))))
        return terms

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """y = base(x) + sum over the active adapters a held here of scaling_a * (terms of a), in x's dtype.

        Each term is cast to the base output's dtype, then scaled and added, in peft's order (so
        low-precision bases round as in peft).
        """
        previous_dtype = x.dtype
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.gralora_A:
                continue
            for term in self.delta_terms(x, name):
                result = result + self.scaling[name] * term.to(result.dtype)
        return result.to(previous_dtype)

    # ------------------------------------------------------------------ merging (additive)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = scaling * (blocks + B_h A_h), laid out like the base weight (transposed for Conv1D).

        fp16/bf16 factors on the CPU are multiplied in float32 and the result cast back, as in peft.
        """
        factor_a, factor_b = self.gralora_A[adapter_name], self.gralora_B[adapter_name]
        dtype = factor_a.dtype
        upcast = factor_a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        compute = torch.float32 if upcast else dtype
        delta = block_delta_weight(factor_a.to(compute), factor_b.to(compute))
        if self.hybrid_r[adapter_name] > 0:
            general_a = self.gralora_A_general[adapter_name].weight.to(compute)
            general_b = self.gralora_B_general[adapter_name].weight.to(compute)
            delta = delta + general_b @ general_a
        delta = delta.T if self.fan_in_fan_out else delta
        return (delta * self.scaling[adapter_name]).to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "gralora." + super().__repr__()


class Linear(GraloraLayer):
    """GraLoRA on `nn.Linear`, transformers' `Conv1D` (weight stored in x out) or a quantized linear layer."""


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    base = base_of(target)
    if is_linear_like(base):
        return Linear(target, adapter_name, **layer_kwargs)
    return None
