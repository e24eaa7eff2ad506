"""`add_weighted_adapter`: a new LoRA adapter built from a weighted combination of existing ones.

- "cat":    stack the factors; rank = sum of ranks; exact: delta = sum_i w_i * s_i * B_i A_i.
- "linear" / "ties" / "dare_*" / "magnitude_prune": combine the A's and the B's separately with
  weights sign(w s) * sqrt(|w s|) and sqrt(|w s|); needs equal ranks; an approximation.
- "svd" and "<method>_svd": combine the full deltas, then truncate by SVD to `svd_rank`.
The new adapter has `lora_alpha == r`, i.e. scaling 1 (the weights carry the scale).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from functools import reduce
from typing import TYPE_CHECKING, Optional

import torch

from ...errors import ConfigError
from ...utils.merge_utils import SignMethod, combine
from .._core.modules_to_save import ModulesToSaveWrapper
from .extra_variants import FIELDS as VARIANT_FIELDS
from .layer import Conv, LoraLayer

if TYPE_CHECKING:  # pragma: no cover
    from .model import LoraModel

FACTOR_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _max_rank(config) -> int:
    return max([config.r, *config.rank_pattern.values()]) if config.rank_pattern else config.r


def _plan(tuner: "LoraModel", adapters: list[str], weights: list[float], combination_type: str, svd_rank: Optional[int], density: Optional[float]):
    """Validate the request; return (combination, new rank, new target_modules)."""
    if isinstance(adapters, str) or not len(adapters):
        raise ConfigError(
            f"add_weighted_adapter needs a non-empty list of adapter names to combine, got {adapters!r}; "
            f"e.g. adapters={sorted(tuner.peft_config)[:2]}, weights=[0.5, 0.5]."
        )
    tuner._check_adapter_exists(list(adapters))
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ConfigError(f"weights must be a list of numbers, one per adapter, got {weights!r}.")
    if len(weights) != len(adapters):
        raise ConfigError(f"Got {len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter.")
    _check_weights(weights)
    for name in adapters:
        if tuner.peft_config[name].target_parameters:
            raise ConfigError(
                f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{name}'); "
                "combine adapters that use target_modules only."
            )
    wrappers = [m for m in tuner.model.modules() if isinstance(m, ModulesToSaveWrapper)]
    shared = [w for w in wrappers if sum(name in w.modules_to_save for name in adapters) > 1]
    if shared:
        raise ConfigError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s). Modules trained in full cannot be combined; drop them from one adapter."
        )
    with_bias = [name for name in adapters if tuner.peft_config[name].lora_bias]
    if with_bias:
        raise ConfigError(
            f"Cannot combine adapters {with_bias} with lora_bias=True: the combination covers the A/B factors, "
            "not B's bias, so the result would silently drop it. Combine adapters without lora_bias."
        )
    with_variant = [name for name in adapters if any(getattr(tuner.peft_config[name], f) for f in VARIANT_FIELDS.values())]
    if with_variant:
        raise ConfigError(
            f"Cannot combine adapters {with_variant}: VeLoRA / BD-LoRA / MonteCLoRA / KaSA adapters carry more than "
            "plain A/B factors (projection vectors, block layouts, samplers, lora_diag). Combine plain LoRA adapters."
        )
    combination = "linear" if len(adapters) == 1 else combination_type
    ranks = [_max_rank(tuner.peft_config[name]) for name in adapters]
    if combination in FACTOR_COMBINATIONS:
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination_type {combination!r} needs adapters of equal rank, got {ranks}; use 'cat' or 'svd'.")
        new_rank = ranks[0]
    elif combination == "cat":
        new_rank = sum(ranks)
    elif combination in SVD_COMBINATIONS:
        new_rank = svd_rank or max(ranks)
    else:
        raise ConfigError(f"Unknown combination_type {combination_type!r}; use one of {('cat',) + FACTOR_COMBINATIONS + SVD_COMBINATIONS}.")
    needs_density = combination not in ("linear", "cat", "svd")
    if needs_density and (density is None or not 0 <= density <= 1):
        raise ConfigError(f"combination_type {combination!r} needs density in [0, 1] (the fraction kept), got {density!r}.")
    targets = [tuner.peft_config[name].target_modules for name in adapters]
    if len({type(t) for t in targets}) > 1:
        raise ConfigError("Cannot combine adapters whose target_modules mix regex strings and name lists.")
    new_targets = "|".join(f"({t})" for t in targets) if isinstance(targets[0], str) else reduce(operator.or_, map(set, targets))
    return combination, new_rank, new_targets


def _check_weights(weights: list[float]) -> None:
    """Every weight a finite real number: a NaN/inf weight would silently give a NaN/inf adapter."""
    bad = []
    for weight in weights:
        try:
            value = float(weight)
        except (TypeError, ValueError, RuntimeError):
            value = None
        if value is None or isinstance(weight, bool) or not math.isfinite(value):
            bad.append(weight)
    if bad:
        raise ConfigError(
            f"add_weighted_adapter weights must be finite numbers, got {list(weights)!r} (bad: {bad!r}); "
            "pass one float per adapter, e.g. [0.5, 0.5]."
        )


def add_weighted_adapter(
    tuner: "LoraModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: SignMethod = "total",
) -> None:
    """Create `adapter_name` from `adapters` combined with `weights` (see module docstring)."""
    if adapter_name in tuner.peft_config:
        warnings.warn(f"Adapter {adapter_name!r} exists already; add_weighted_adapter does nothing.", stacklevel=3)
        return
    combination, new_rank, new_targets = _plan(tuner, adapters, weights, combination_type, svd_rank, density)
    base_config = tuner.peft_config[adapters[0]]
    config = dataclasses.replace(
        base_config, r=new_rank, lora_alpha=new_rank, target_modules=new_targets, rank_pattern={}, alpha_pattern={}
    )
    tuner.add_adapter(adapter_name, config)
    recipe = _Recipe(combination, new_rank, density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
    try:
        _fill(tuner, adapters, weights, adapter_name, recipe)
    except BaseException:
        tuner.delete_adapter(adapter_name)  # leave the model as it was
        raise


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How to combine: the method, the new rank and the method's options."""

    combination: str
    rank: int
    density: Optional[float]
    sign_method: SignMethod
    svd_clamp: Optional[float]
    svd_full_matrices: bool
    svd_driver: Optional[str]


def _fill(tuner: "LoraModel", adapters: list[str], weights: list[float], adapter_name: str, recipe: _Recipe) -> None:
    """Write the combined factors into every layer of the new adapter, then freeze it."""
    for _, layer in tuner.tuner_layers():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        present = [(name, w) for name, w in zip(adapters, weights) if name in layer.r]
        if not present:
            continue
        if recipe.combination == "cat":
            new_a, new_b = _cat(layer, present, recipe.rank)
        elif recipe.combination in SVD_COMBINATIONS:
            new_a, new_b = _svd(layer, present, recipe)
        else:
            new_a, new_b = _factors(layer, present, recipe.combination, recipe.density, recipe.sign_method)
        weight_a, weight_b = _factor_tensors(layer, adapter_name)
        with torch.no_grad():
            weight_a.copy_(new_a.reshape(weight_a.shape))
            weight_b.copy_(new_b.reshape(weight_b.shape))
    for param in (p for _, layer in tuner.tuner_layers() for p in layer.adapter_params([adapter_name])):
        param.requires_grad_(False)


def _factor_tensors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter: module weights, or the embedding's bare parameters."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _cat(layer: LoraLayer, present: list, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows and B columns side by side; zero-padded when some adapters skip this layer."""
    parts_a, parts_b = [], []
    for name, weight in present:
        weight_a, weight_b = _factor_tensors(layer, name)
        parts_a.append(weight_a.detach() * weight * float(layer.scaling[name]))
        parts_b.append(weight_b.detach())
    new_a, new_b = torch.cat(parts_a, dim=0), torch.cat(parts_b, dim=1)
    missing = new_rank - new_a.shape[0]
    if missing:
        new_a = torch.cat([new_a, new_a.new_zeros((missing,) + new_a.shape[1:])], dim=0)
        new_b = torch.cat([new_b, new_b.new_zeros((new_b.shape[0], missing) + new_b.shape[2:])], dim=1)
    return new_a, new_b


def _factors(layer: LoraLayer, present: list, method: str, density, sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine A's and B's separately, splitting each weight w*s as sign*sqrt|ws| and sqrt|ws|."""
    tensors_a, tensors_b, weights_a, weights_b = [], [], [], []
    for name, weight in present:
        weight_a, weight_b = _factor_tensors(layer, name)
        scaled = weight * float(layer.scaling[name])
        weights_a.append(math.copysign(math.sqrt(abs(scaled)), scaled))
        weights_b.append(math.sqrt(abs(scaled)))
        tensors_a.append(weight_a.detach())
        tensors_b.append(weight_b.detach())
    dtype = tensors_a[0].dtype
    new_a = combine(tensors_a, weights_a, method, density, sign_method).to(dtype)
    new_b = combine(tensors_b, weights_b, method, density, sign_method).to(dtype)
    return new_a, new_b


def _svd(layer: LoraLayer, present: list, recipe: _Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine full deltas, then keep the top `rank` singular directions: B = U S, A = Vh."""
    method = "linear" if recipe.combination == "svd" else recipe.combination[: -len("_svd")]
    new_rank, clamp = recipe.rank, recipe.svd_clamp
    deltas = [layer.get_delta_weight(name).detach() for name, _ in present]
    delta = combine(deltas, [w for _, w in present], method, recipe.density, recipe.sign_method)
    if isinstance(layer, Conv):
        delta = delta.flatten(1)
    elif getattr(layer, "fan_in_fan_out", False) or layer.lora_embedding_A:
        delta = delta.T  # back to (out, in) = B A layout
    u, s, vh = torch.linalg.svd(delta, full_matrices=recipe.svd_full_matrices, driver=recipe.svd_driver)
    u, vh = u[:, :new_rank] * s[:new_rank], vh[:new_rank]
    if clamp is not None:
        limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-limit, limit), vh.clamp(-limit, limit)
    rank = u.shape[1]
    if rank < new_rank:  # the layer is smaller than the requested rank: pad with zero directions
        u = torch.cat([u, u.new_zeros(u.shape[0], new_rank - rank)], dim=1)
        vh = torch.cat([vh, vh.new_zeros(new_rank - rank, vh.shape[1])], dim=0)
    return vh, u
