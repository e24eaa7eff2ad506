"""Combining several task tensors (adapter weights or weight deltas) into one.

    task arithmetic:  sum_i w_i * t_i
    magnitude_prune:  sum_i w_i * top_k(|t_i|, density)
    ties:             trim (top-k), elect a sign per entry, average the agreeing entries
    dare_linear:      sum_i w_i * bernoulli(density) * t_i / density
    dare_ties:        DARE's random drop, then TIES' sign election and disjoint mean

References: TIES-Merging (Yadav et al., 2023), DARE (Yu et al., 2023).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, Optional

import torch

from ..errors import ConfigError

SignMethod = Literal["total", "frequency"]
COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each stacked tensor by its weight (weights broadcast over the trailing dims)."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1)).to(stacked)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `int(density * numel)` entries of largest magnitude."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().flatten(), k=keep).indices] = 1
    return tensor * mask.view_as(tensor)


def drop_randomly(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale by 1/density (unbiased)."""
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _sparsify(tensor: torch.Tensor, density: float, randomly: bool) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"density={density} keeps every value; nothing is pruned.", stacklevel=3)
        return tensor
    return drop_randomly(tensor, density) if randomly else keep_largest(tensor, density)


def elect_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """True where an entry's sign agrees with the elected sign (by summed mass or by vote count)."""
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method={method!r} is invalid; use 'total' or 'frequency'.")
    return stacked.sign() == torch.where(votes >= 0, 1, -1)


def disjoint_mean(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries selected by `mask` (entries no tensor keeps become 0)."""
    return (stacked * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1.0)


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str = "linear",
    density: Optional[float] = None,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """Merge same-shaped task tensors with one of `COMBINATIONS`."""
    if method not in COMBINATIONS:
        raise ConfigError(f"Unknown combination {method!r}; use one of {COMBINATIONS}.")
    weight_tensor = torch.as_tensor(list(weights), dtype=torch.float32)
    if method != "linear":
        if density is None or not 0 <= density <= 1:
            raise ConfigError(f"combination {method!r} needs density in [0, 1] (the fraction kept), got {density!r}.")
        tensors = [_sparsify(t, density, randomly=method.startswith("dare")) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    weighted = _weighted(stacked, weight_tensor)
    if method in ("ties", "dare_ties"):
        return disjoint_mean(weighted, elect_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)
