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


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights` (one per stacked tensor) shaped to broadcast over the stacked tensors' trailing dims."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each stacked tensor by its weight."""
    return stacked * reshape_weight_task_tensors(stacked, torch.as_tensor(weights)).to(stacked)


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `int(density * numel)` entries of largest magnitude."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().flatten(), k=keep).indices] = 1
    return tensor * mask.view_as(tensor)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability `density`; with `rescale`, divide by density (unbiased)."""
    pruned = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False) -> torch.Tensor:
    """Keep the fraction `density` of `tensor`'s entries: the largest ("magnitude") or random ones."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """True where an entry's sign agrees with the elected sign over dim 0 (by summed mass, or by vote count)."""
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = tensor.sign().sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return tensor.sign() == torch.where(votes >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries selected by the mask (entries no tensor keeps become 0)."""
    return (task_tensors * majority_sign_mask).sum(dim=0) / majority_sign_mask.sum(dim=0).clamp(min=1.0)


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * t_i"""
    return _weighted(torch.stack(list(task_tensors), dim=0), weights).sum(dim=0)


def magnitude_prune(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """sum_i w_i * top_k(|t_i|, density)"""
    return task_arithmetic([prune(t, density, method="magnitude") for t in task_tensors], weights)


def dare_linear(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """sum_i w_i * bernoulli(density) * t_i / density"""
    return task_arithmetic([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def _sign_elected_mean(pruned: Sequence[torch.Tensor], weights: torch.Tensor, majority_sign_method: SignMethod) -> torch.Tensor:
    stacked = torch.stack(list(pruned), dim=0)
    return disjoint_merge(_weighted(stacked, weights), calculate_majority_sign_mask(stacked, method=majority_sign_method))


def ties(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES: trim to the largest entries, elect a sign per entry, average the agreeing weighted entries."""
    return _sign_elected_mean([prune(t, density, method="magnitude") for t in task_tensors], weights, majority_sign_method)


def dare_ties(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """DARE's random drop (rescaled), then TIES' sign election and disjoint mean."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _sign_elected_mean(pruned, weights, majority_sign_method)


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str = "linear",
    density: Optional[float] = None,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """Merge same-shaped task tensors with one of `COMBINATIONS` (peft's functions above)."""
    if method not in COMBINATIONS:
        raise ConfigError(f"Unknown combination {method!r}; use one of {COMBINATIONS}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method={majority_sign_method!r} is invalid; use 'total' or 'frequency'.")
    weight_tensor = torch.as_tensor(list(weights), dtype=torch.float32)
    if method == "linear":
        return task_arithmetic(tensors, weight_tensor)
    if density is None or not 0 <= density <= 1:
        raise ConfigError(f"combination {method!r} needs density in [0, 1] (the fraction kept), got {density!r}.")
    if method in ("ties", "dare_ties"):
        merge = ties if method == "ties" else dare_ties
        return merge(tensors, weight_tensor, density, majority_sign_method)
    merge = magnitude_prune if method == "magnitude_prune" else dare_linear
    return merge(tensors, weight_tensor, density)
