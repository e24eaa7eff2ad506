"""The one place that knows how transformers names things that moved across the 5.x releases.

KV cache:

transformers up to 5.23 called the cache argument of every model forward `past_key_values`;
5.24 renamed it `cache` (the old name is still accepted with a deprecation warning until 5.40),
and `prepare_inputs_for_generation` now hands the cache over under `cache`. Nothing else in
peftkit spells either name: it asks here.

    cache_argument(model)        -> "cache" | "past_key_values" | None   (read off forward's signature)
    get_cache(kwargs) / pop_cache(kwargs) -> the cache passed under either name
    put_cache(kwargs, cache, model)  : the cache under the name `model.forward` takes
    rename_cache(kwargs, model)      : move a cache given under either name to that name
    output_cache_name(output)        : the field of a model output that carries its cache

The name comes from the signature, not from a version number, so a model with its own forward
(remote code, a custom head) gets the name it actually takes.

Activation checkpointing: transformers 5.23 renamed `gradient_checkpointing_enable(gradient_checkpointing_kwargs=)`
to `activation_checkpointing_enable(activation_checkpointing_kwargs=, every_n_layers=, offload=)`, and
the `TrainingArguments` flag `gradient_checkpointing` to `activation_checkpointing` (old names kept as
deprecated aliases). `checkpointing_argument`, `enable_activation_checkpointing` and
`is_activation_checkpointing` pick whichever the installed release has, by attribute.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

from torch import nn

from ..errors import ConfigError

#: Newest first: a forward that takes both (during a deprecation window) gets the new name.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def cache_argument(model_or_forward: nn.Module | Callable[..., Any]) -> Optional[str]:
    """The name under which `model.forward` takes a KV cache, or None if it takes none."""
    forward = model_or_forward.forward if isinstance(model_or_forward, nn.Module) else model_or_forward
    # Read once per function (it runs at every forward and generate step); a bound method's
    # signature is its function's, less `self`.
    return _cache_argument_of(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=256)
def _cache_argument_of(function: Callable[..., Any]) -> Optional[str]:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        return None
    return next((name for name in CACHE_ARGUMENT_NAMES if name in parameters), None)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache passed under any of its names (None when there is none).

    Passing it under two names at once is ambiguous, so it is refused.
    """
    given = [name for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ConfigError(f"Got a KV cache under both {given[0]!r} and {given[1]!r}; pass it once (as {given[0]!r}).")
    values = [kwargs.pop(name, None) for name in CACHE_ARGUMENT_NAMES]
    return next((value for value in values if value is not None), None)


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in `kwargs` under any of its names, left in place (None when there is none)."""
    return next((kwargs[name] for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)


def put_cache(kwargs: dict[str, Any], cache: Any, model: nn.Module, default: str = CACHE_ARGUMENT_NAMES[0]) -> str:
    """Store `cache` in `kwargs` under the name `model.forward` takes (replacing any other name).

    Returns the name used; `default` when the forward's signature names neither (e.g. `**kwargs`).
    """
    pop_cache(kwargs)
    name = cache_argument(model) or default
    kwargs[name] = cache
    return name


def rename_cache(kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`kwargs` with its cache (if any) under the name `model.forward` takes; returns `kwargs`."""
    cache = get_cache(kwargs)
    if cache is not None:
        put_cache(kwargs, cache, model)
    return kwargs


def output_cache_name(output: Any) -> Optional[str]:
    """The field of a model output (instance or ModelOutput class) that carries the KV cache.

    The one holding a cache if any does, else the first of the names the output has; None if it has neither.
    """
    if isinstance(output, type):
        fields = {field.name for field in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
        return next((name for name in CACHE_ARGUMENT_NAMES if name in fields), None)
    names = [name for name in CACHE_ARGUMENT_NAMES if hasattr(output, name)]
    filled = [name for name in names if getattr(output, name) is not None]
    return (filled or names or [None])[0]


# ---------------------------------------------------------------------------------------------- checkpointing
def checkpointing_argument(args: Any) -> str:
    """The `TrainingArguments` flag (instance or class) that turns on activation checkpointing."""
    return "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"


def enable_activation_checkpointing(model: nn.Module, options: Optional[dict] = None, **extra: Any) -> None:
    """Turn on activation checkpointing in a transformers model, under the API its release has.

    `extra` (`every_n_layers`, `offload`) exist from transformers 5.23 on; an older release only
    accepts their defaults, and a non-default value is refused rather than dropped.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **extra)
        return
    defaults = {"every_n_layers": 1, "offload": False}
    unsupported = sorted(key for key, value in extra.items() if value is not None and defaults.get(key, object()) != value)
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} need transformers >= 5.23 (activation_checkpointing_enable); this release only "
            "has gradient_checkpointing_enable. Upgrade transformers or drop these options."
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on in a transformers model (any 5.x release)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
