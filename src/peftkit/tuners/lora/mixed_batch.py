r"""Mixed-adapter batches: every row of a batch uses its own LoRA adapter (or none), in one pass.

For Linear layers the adapters present in the batch are stacked, zero-padded to the largest rank,
with each adapter's scaling folded into its B, and row 0 of the stack left zero for "__base__":

    A_all: (n + 1, r_max, in)      B_all: (n + 1, out, r_max)
    y_b = W x_b + B_all[i_b] (A_all[i_b] x_b)        (two batched matmuls over the rows b)

so the cost grows with the batch size and r_max, not with the number of distinct adapters. The
per-row stacks are cached between calls when no gradient is needed (inference), keyed on the row
names and the adapters' parameter versions; a batch whose rows all use one adapter takes the plain
single-adapter path. Embedding and Conv layers, which are cheap or rare targets, loop over the
adapters present instead.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Optional

import torch

from ...errors import AdapterNameError, AdapterStateError
from ...utils.adapter_names import BASE_ADAPTER_NAME


def expand_to_batch(names: Sequence[str], batch: int) -> tuple[str, ...]:
    """One name per row; rows repeated by generate (beams, num_return_sequences) repeat the name."""
    if batch % len(names):
        raise AdapterStateError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {batch} respectively (or a divisor of the rows, for generate's repeated rows); "
            "pass one name per row."
        )
    repeat = batch // len(names)
    if repeat == 1 and isinstance(names, tuple):
        return names
    return tuple(name for name in names for _ in range(repeat))


def row_index(names: Sequence[str], available: Container[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct adapters of this layer, in order of appearance; per-row index into [base] + distinct).

    Rows whose adapter is "__base__" or does not wrap this layer get index 0 (no update).
    """
    distinct = list(dict.fromkeys(name for name in names if name in available))
    lookup = {name: i + 1 for i, name in enumerate(distinct)}
    return distinct, torch.tensor([lookup.get(name, 0) for name in names])


def _cached_row_index(layer, names: tuple[str, ...]) -> tuple[list[str], torch.Tensor, bool]:
    """`row_index` for this layer and whether every row uses its one adapter, remembered for the
    same names (each decode step repeats them)."""
    key = (names, tuple(layer.r))
    cached = layer.__dict__.get("_mixed_batch_rows")
    if cached is None or cached[0] != key:
        distinct, index = row_index(names, layer.r)
        cached = (key, (distinct, index, len(distinct) == 1 and bool((index == 1).all())))
        layer.__dict__["_mixed_batch_rows"] = cached
    return cached[1]


def uniform_adapter(layer, x: torch.Tensor, names: Sequence[str]) -> Optional[str]:
    """The adapter every row of `x` uses on this layer, or None (mixed rows, or none wraps it)."""
    distinct, _, uniform = _cached_row_index(layer, expand_to_batch(names, x.shape[0]))
    return distinct[0] if uniform else None


def _stack(layer, distinct: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A_all (n+1, r_max, in) and B_all (n+1, out, r_max) with scalings folded into B."""
    rank = max(layer.r[name] for name in distinct)
    weight_a = layer.lora_A[distinct[0]].weight
    a_all = weight_a.new_zeros(len(distinct) + 1, rank, layer.in_features)
    b_all = weight_a.new_zeros(len(distinct) + 1, layer.out_features, rank)
    parts_a = [torch.nn.functional.pad(layer.lora_A[n].weight, (0, 0, 0, rank - layer.r[n])) for n in distinct]
    parts_b = [torch.nn.functional.pad(layer.lora_B[n].weight * layer.scaling[n], (0, rank - layer.r[n])) for n in distinct]
    a_all = torch.cat([a_all[:1], torch.stack(parts_a)])
    b_all = torch.cat([b_all[:1], torch.stack(parts_b)])
    return a_all, b_all


def _row_stacks(layer, names: tuple[str, ...], distinct: list[str], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row A (batch, r_max, in) and B (batch, out, r_max), cached while no gradient is needed.

    The cache holds the gathered per-row stacks, keyed on the row names and the adapters' parameter
    versions, so a decode step (one token per row, the same names every step) does no stacking or
    gathering at all.
    """
    params = _factor_weights(layer, distinct)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        a_all, b_all = _stack(layer, distinct)
        index = index.to(a_all.device)
        return a_all[index], b_all[index]
    key = (names, tuple(p._version for p in params), tuple(p.data_ptr() for p in params),
           tuple(float(layer.scaling[n]) for n in distinct))
    cache = layer.__dict__.get("_mixed_batch_cache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            a_all, b_all = _stack(layer, distinct)
            index = index.to(a_all.device)
            cache = (key, (a_all[index], b_all[index]))
        layer.__dict__["_mixed_batch_cache"] = cache
    return cache[1]


def _factor_weights(layer, distinct: list[str]) -> list[torch.Tensor]:
    """[A_1, B_1, A_2, B_2, ...] of the adapters in `distinct`.

    Read from the containers' dicts, not by attribute: a decode step needs them for its cache key
    on every layer, and `nn.Module.__getattr__` made this lookup ~10 % of a 32-adapter decode step.
    """
    factors_a, factors_b = layer.lora_A._modules, layer.lora_B._modules
    return [p for name in distinct for p in (factors_a[name]._parameters["weight"], factors_b[name]._parameters["weight"])]


def _row_dropout(layer, x: torch.Tensor, distinct: list[str], index: torch.Tensor) -> torch.Tensor:
    """Each row gets the dropout of its adapter (inverted dropout, only in training)."""
    if not layer.training:
        return x
    rates = [0.0] + [float(getattr(layer.lora_dropout[name], "p", 0.0)) for name in distinct]
    if not any(rates):
        return x
    keep = (1.0 - torch.tensor(rates, device=x.device, dtype=x.dtype))[index.to(x.device)]
    keep = keep.view(-1, *([1] * (x.dim() - 1)))
    return x * torch.bernoulli(keep.expand_as(x)) / keep


def linear_delta(layer, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Per-row LoRA update of a Linear / Conv1D layer, computed with two batched matmuls."""
    names = expand_to_batch(names, x.shape[0])
    distinct, index, uniform = _cached_row_index(layer, names)
    if not distinct:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    if uniform:
        return layer._lora_delta_output(x, distinct[0])  # one adapter for every row: the plain path
    a_rows, b_rows = _row_stacks(layer, names, distinct, index)
    index = index.to(a_rows.device)
    rows = x.to(a_rows.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
    rows = _row_dropout(layer, rows, distinct, index)
    hidden = torch.bmm(rows, a_rows.transpose(1, 2))  # (batch, tokens, r_max)
    out = torch.bmm(hidden, b_rows.transpose(1, 2))  # (batch, tokens, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def looped_delta(layer, x: torch.Tensor, names: Sequence[str], adapter_output) -> torch.Tensor:
    """Per-row update for Embedding / Conv layers: one sub-batch per distinct adapter."""
    names = expand_to_batch(names, x.shape[0])
    distinct, index = row_index(names, layer.r)
    delta = None
    for position, name in enumerate(distinct, start=1):
        rows = (index == position).nonzero().flatten().to(x.device)
        out = adapter_output(x.index_select(0, rows), name)
        if delta is None:
            delta = out.new_zeros((x.shape[0],) + out.shape[1:])
        delta = delta.index_add(0, rows, out)
    return delta if delta is not None else torch.zeros((), dtype=x.dtype, device=x.device)


def check_names(names: Sequence[str], known: Sequence[str]) -> None:
    """Every name must be a loaded adapter or "__base__"."""
    if isinstance(names, str) or not len(names):
        raise AdapterNameError("adapter_names must be a non-empty list with one adapter name per row.")
    unknown = sorted({name for name in names if name != BASE_ADAPTER_NAME and name not in known})
    if unknown:
        raise AdapterNameError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. adapter_names lists unknown "
            f"adapters {unknown}; known: {sorted(known)} (or {BASE_ADAPTER_NAME!r} for none)."
        )
