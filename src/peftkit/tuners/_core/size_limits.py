"""Refuse absurd adapter sizes against the model's own dimensions, before anything is allocated.

An untrusted `adapter_config.json` sizes memory: `r=10**9` on a 16 x 16 layer asks the allocator
for ~128 GB and fails with a raw RuntimeError (or takes the machine's memory). Config creation
bounds every size (`utils.validation.MAX_SIZE`); here each size is compared with what it adapts.

The rule (the same for layers and prompts): an adapter is refused when it would add more than

    max(ELEMENTS_FACTOR * base elements, MIN_ELEMENTS_LIMIT) = max(64 * base, 2**26) elements,

"base" being the wrapped layer's parameters (prompt learning: the whole model's). Ranks above a
layer's dimensions -- common in tests on tiny models -- stay allowed: a rank 64 adapter on a 16 x 16
layer adds 2,048 elements, far below 2**26 (64 Mi elements, 256 MiB in fp32). Only sizes no real
adapter uses are refused.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ...errors import ConfigError
from .layer import BaseTunerLayer
from .matching import matching_pattern

#: An adapter may add up to this many times the elements of what it adapts ...
ELEMENTS_FACTOR = 64
#: ... and always at least this many (2**26 = 64 Mi elements).
MIN_ELEMENTS_LIMIT = 2**26

#: `layer_kwargs` entries that size a layer adapter; each adds about `size * (in + out)` elements.
_SIZE_KWARGS = ("r", "bottleneck_size")


def element_limit(base_elements: int) -> int:
    """The most elements an adapter of something with `base_elements` elements may add."""
    return max(ELEMENTS_FACTOR * base_elements, MIN_ELEMENTS_LIMIT)


def _base_of(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def _in_plus_out(base: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a layer, from its declared sizes or its weight; (1, 1) when unknown.

    (1, 1) is the most lenient estimate (used for blocks such as bottleneck targets "attention").
    """
    for in_name, out_name in (("in_features", "out_features"), ("num_embeddings", "embedding_dim")):
        n_in, n_out = getattr(base, in_name, None), getattr(base, out_name, None)
        if isinstance(n_in, int) and isinstance(n_out, int):
            return n_in, n_out
    weight = getattr(base, "weight", None)
    shape = tuple(getattr(weight, "shape", ()))
    if len(shape) >= 2:
        return math.prod(shape[1:]), shape[0]
    return 1, 1


def _size_label(config: Any, name: str, size: int, key: str) -> str:
    """The config field a layer size came from (e.g. `rank_pattern['v_proj']`), for the message."""
    if name == "bottleneck_size":
        return "adapter_dim"
    if hasattr(config, "init_r"):
        return "init_r"
    patterns = getattr(config, "rank_pattern", None) or {}
    if isinstance(patterns, dict) and size != getattr(config, "r", size):
        pattern = matching_pattern(patterns, key, "rank_pattern")  # the entry `pattern_value` took the size from
        if pattern is not None:
            return f"rank_pattern[{pattern!r}]"
    return "r"


def check_layer_adapter_size(config: Any, layer_kwargs: dict[str, Any], target: nn.Module, key: str) -> None:
    """ConfigError if the adapter `layer_kwargs` describe would add an absurd number of elements to `target`.

    A size s (rank or bottleneck width) adds about `s * (in + out)` elements (LoRA's A and B,
    a bottleneck's down and up projection); the limit is `element_limit(base layer elements)`.
    """
    base = _base_of(target)
    n_in, n_out = _in_plus_out(base)
    base_elements = sum(p.numel() for p in base.parameters())
    limit = element_limit(base_elements)
    for name in _SIZE_KWARGS:
        size = layer_kwargs.get(name)
        if not isinstance(size, int) or isinstance(size, bool):
            continue
        added = size * (n_in + n_out)
        if added > limit:
            _refuse(_size_label(config, name, size, key), size, key, added, type(base).__name__, base_elements,
                    f"{n_in} inputs, {n_out} outputs", limit)


def check_parameter_adapter_size(config: Any, size: Any, target: nn.Module, param_name: str, key: str) -> None:
    """`check_layer_adapter_size` for LoRA on the bare parameter `param_name` of `target` (`target_parameters`).

    A 2-D (out, in) parameter gets `r * (in + out)` elements, a 3-D (experts, a, b) stack
    `experts * r * (a + b)`; the limit is `element_limit(the parameter's elements)`.
    """
    param = getattr(_base_of(target), param_name)  # through the wrappers of other parameters of `target`
    if not isinstance(size, int) or isinstance(size, bool) or param.dim() < 2:
        return
    *stack, n_a, n_b = param.shape
    added = math.prod(stack) * size * (n_a + n_b)
    limit = element_limit(param.numel())
    if added > limit:
        _refuse(_size_label(config, "r", size, key), size, key, added, "parameter", param.numel(),
                "shape " + "x".join(map(str, param.shape)), limit)


def _refuse(label: str, size: int, key: str, added: int, kind: str, base_elements: int, dims: str, limit: int) -> None:
    raise ConfigError(
        f"{label}={size} for {key!r} would add about {added:,} adapter elements to a {kind} "
        f"of {base_elements:,} elements ({dims}); peftkit refuses more than "
        f"max({ELEMENTS_FACTOR} x the base layer, 2**26) = {limit:,} as implausible (an untrusted or damaged "
        f"config?). Use a much smaller {label}: ranks and bottleneck sizes are typically 4 to 256."
    )


def check_prompt_adapter_size(config: Any, model: nn.Module) -> None:
    """ConfigError if a prompt-learning adapter (`config.adapter_elements()`) is absurd for `model`.

    The limit is `element_limit(all parameters of the model)`; the shape fields must be filled.
    """
    added = config.adapter_elements()
    base_elements = sum(p.numel() for p in model.parameters())
    limit = element_limit(base_elements)
    if added > limit:
        fields = ", ".join(f"{name}={value}" for name, value in config.size_fields().items() if value is not None)
        raise ConfigError(
            f"{fields} would allocate about {added:,} prompt elements for a model of {base_elements:,} parameters; "
            f"peftkit refuses more than max({ELEMENTS_FACTOR} x the model, 2**26) = {limit:,} as implausible (an "
            "untrusted or damaged config?). Use realistic sizes, e.g. num_virtual_tokens=20."
        )


def check_targets_adapter_size(tuner: Any, config: Any, adapter_name: str, keys: list[str]) -> None:
    """`check_layer_adapter_size` for every module path in `keys`, with the sizes `tuner.layer_kwargs` gives.

    Called by `BaseTuner._inject` for all targets before the first one is wrapped, so an absurd
    size (even one `rank_pattern` gives a single module) leaves the model untouched.
    """
    from .module_tree import get_submodules

    for key in keys:
        _, target, _ = get_submodules(tuner.model, key)
        check_layer_adapter_size(config, tuner.layer_kwargs(config, adapter_name, key, target), target, key)
