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
    pattern = config.layers_pattern
    if pattern is not None and not isinstance(pattern, str) and not (
        isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern)
    ):
        raise ConfigError(f"layers_pattern={pattern!r} is invalid; pass a name such as 'layers' or a list of names.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("layers_pattern is only used with layers_to_transform; set layers_to_transform too.")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is invalid; it must be True or False.")


def check_optional_name_list(value: Any, name: str) -> Any:
    """None, or a list of module names (a single string is accepted as a one-item list)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"{name}={value!r} is invalid; pass a list of module names such as ['classifier'].")


def check_pattern_dict(value: Any, name: str) -> dict:
    """rank_pattern / alpha_pattern: a dict of regex -> number (None means empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ConfigError(f"{name}={value!r} is invalid; pass a dict of module-name regex -> value, e.g. {{'q_proj': 16}}.")
    return value


def check_layer_indices(value: Any, name: str = "layers_to_transform") -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return
    raise ConfigError(f"{name}={value!r} is invalid; pass a layer index or a list of indices, e.g. [0, 1].")
