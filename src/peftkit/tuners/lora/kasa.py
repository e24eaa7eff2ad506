r"""KaSA: knowledge-aware singular-value adaptation (Wang et al. 2024, https://arxiv.org/abs/2412.06071).

Two changes to LoRA on a Linear layer with k = min(in, out) and rank r < k:

1. When the adapter is added, the frozen base weight loses its r smallest singular components,
   once and for good (a destructive edit, like PiSSA's):

       W = U S V^T  (S descending)      W <- U[:, :k-r] S[:k-r] V[:, :k-r]^T

2. The update carries a trained diagonal of singular values `lora_diag` (d, r entries, N(0, 1) at
   init; B starts at zero, so the adapter starts as a no-op on the truncated base):

       y = W x + s B diag(d) A dropout(x)          delta_W = s (B * d) A

Disabling or unloading the adapter leaves the truncated W; merging / unmerging adds / removes
`s (B * d) A` on it. Because the base depends on whether a KaSA adapter was added, a model takes
either only KaSA adapters or none (peft's rule). The paper's regularisers are offered as
`LoraModel._get_kasa_loss()` (add it to the task loss):

    beta * sum(d^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)       summed over KaSA layers
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from .._core.base_journal import record_base_weight

if TYPE_CHECKING:
    from .layer import LoraLayer


@dataclass
class KasaConfig:
    """KaSA settings (`LoraConfig.kasa_config`): the weights of the two regularisers of `_get_kasa_loss`.

    Args:
        beta: Weight of the singular-value penalty `sum(lora_diag ** 2)` (paper Eq. 9-10).
        gamma: Weight of the orthogonality penalty `||B^T B - I||_F + ||A A^T - I||_F` (Eq. 11).
    """

    beta: float = field(default=1e-4, metadata={"help": "Weight of sum(lora_diag ** 2)"})
    gamma: float = field(default=1e-3, metadata={"help": "Weight of the orthogonality penalty"})

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ConfigError(f"`gamma` must be non-negative, got {self.gamma}.")


def check_kasa_mixing(config: Any, configs: dict[str, Any]) -> None:
    """A model holds only KaSA adapters or none: KaSA changes the base weight the others would see."""
    uses_kasa = getattr(config, "kasa_config", None) is not None
    for name, other in configs.items():
        if other is config:
            continue
        other_uses = getattr(other, "kasa_config", None) is not None
        if uses_kasa is not other_uses:
            raise ConfigError(
                "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base "
                f"weights: the new adapter {'uses' if uses_kasa else 'does not use'} KaSA but adapter "
                f"'{name}' {'does not' if uses_kasa else 'does'}."
            )


def truncate_base_weight(layer: "LoraLayer", rank: int) -> None:
    """W <- its best rank-(k - r) approximation (the r smallest singular components dropped), in place."""
    weight = layer.get_base_layer().weight
    keep = min(weight.shape) - rank
    if keep <= 0:
        raise ConfigError(
            f"KaSA requires `r` ({rank}) to be smaller than min(in_features, out_features) ({min(weight.shape)}) "
            "so that at least one singular component of the base weight is preserved after truncation; lower r "
            "for this module (rank_pattern) or exclude it."
        )
    if weight.is_meta:
        raise ConfigError("KaSA truncates the base weight, which is on the meta device here; load the base model first.")
    record_base_weight(weight)  # put back if the add / load creating this adapter fails (base_journal.py)
    with torch.no_grad():
        left, values, right = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        truncated = (left[:, :keep] * values[:keep]) @ right[:keep]
        weight.copy_(truncated.to(weight.dtype))


class KasaVariant:
    """KaSA as a strategy object for a LoRA `Linear`: an additive variant with the diagonal `lora_diag`."""

    def __init__(self, config: KasaConfig) -> None:
        self.config = config

    @staticmethod
    def init(layer: "LoraLayer", adapter_name: str) -> None:
        if "lora_diag" not in layer._modules:
            layer.lora_diag = nn.ParameterDict({})
            layer.adapter_layer_names = tuple(layer.adapter_layer_names) + ("lora_diag",)
        rank = layer.r[adapter_name]
        weight_a = layer.lora_A[adapter_name].weight
        layer.lora_diag[adapter_name] = nn.Parameter(torch.randn(rank, device=weight_a.device, dtype=weight_a.dtype))
        truncate_base_weight(layer, rank)

    @staticmethod
    def adapter_output(
        layer: "LoraLayer", x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor]
    ) -> torch.Tensor:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        hidden = lora_a(layer.apply_dropout(x, adapter_name).to(lora_a.weight.dtype))
        return lora_b(hidden * layer.lora_diag[adapter_name]) * layer.scaling[adapter_name]

    @staticmethod
    def delta_weight(layer: "LoraLayer", adapter_name: str) -> torch.Tensor:
        """s (B * d) A, (out, in)."""
        weight_b = layer.lora_B[adapter_name].weight
        return (weight_b * layer.lora_diag[adapter_name]) @ layer.lora_A[adapter_name].weight * layer.scaling[adapter_name]


def kasa_regularization(layer: "LoraLayer", adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
    """beta * sum(d^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F) of one layer's adapter, in fp32."""
    diag = layer.lora_diag[adapter_name].float()
    weight_a, weight_b = layer.lora_A[adapter_name].weight.float(), layer.lora_B[adapter_name].weight.float()
    eye = torch.eye(diag.shape[0], device=diag.device)
    orthogonality = torch.linalg.norm(weight_b.T @ weight_b - eye) + torch.linalg.norm(weight_a @ weight_a.T - eye)
    return beta * (diag**2).sum() + gamma * orthogonality
