"""Field checks every adapter config shares; each failure is one `ConfigError` naming the fix."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def as_name_set(names: Any) -> Any:
    """Lists of module names are kept as sets, like peft; a regex string stays a string."""
    if names is None or isinstance(names, str):
        return names
    if isinstance(names, (list, tuple, set, frozenset)):
        if not all(isinstance(name, str) for name in names):
            raise ConfigError(f"Module names must be strings, got {sorted(map(repr, names))}.")
        return set(names)
    raise ConfigError(f"Module names must be a list of strings or a regex string, got {type(names).__name__}.")


def check_rank(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; the rank must be a positive integer such as 8.")


def check_positive_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r} is invalid; it must be a number > 0 (commonly 2 * r).")


def check_dropout(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name}={value!r} is invalid; it must lie in [0, 1).")


def check_layer_selection(config: Any) -> None:
    if config.layers_to_transform is not None and isinstance(config.target_modules, str):
        raise ConfigError(
            "layers_to_transform cannot be used when target_modules is a regex string; "
            "encode the layer indices in the regex or pass target_modules as a list."
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("layers_pattern is only used with layers_to_transform; set layers_to_transform too.")
