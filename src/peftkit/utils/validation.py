"""Field checks every adapter config shares; each failure is one `ConfigError` naming the fix."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from .safe_regex import compile_config_regex

#: Upper bound of every size field (ranks, virtual tokens, hidden sizes) at config creation: larger
#: values are beyond any tensor dimension a model uses (and overflow torch's int64 shape arguments).
#: Sizes below it are checked against the model's own dimensions when the adapter is added
#: (`tuners._core.size_limits`).
MAX_SIZE = 2**31 - 1


def as_name_set(names: Any, field: str = "target_modules") -> Any:
    """Lists of module names are kept as sets, like peft; a regex string stays a string.

    A regex is compiled here (`safe_regex`), so an invalid or catastrophically backtracking one is a
    ConfigError naming `field` when the config is created, not a hang or `re.error` at injection.
    """
    if names is None:
        return names
    if isinstance(names, str):
        compile_config_regex(names, field)
        return names
    if isinstance(names, (list, tuple, set, frozenset)):
        if not all(isinstance(name, str) for name in names):
            raise ConfigError(f"Module names must be strings, got {sorted(map(repr, names))}.")
        return set(names)
    raise ConfigError(f"Module names must be a list of strings or a regex string, got {type(names).__name__}.")


def check_rank(value: Any, name: str) -> None:
    """A rank: an int (not a bool or float) in [1, MAX_SIZE]."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; the rank must be a positive integer such as 8.")
    check_size_bound(value, name)


def check_size(value: Any, name: str, example: str = "8", allow_none: bool = False) -> None:
    """A size field (virtual tokens, hidden size, layers): an int (not a bool or float) in [1, MAX_SIZE]."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        hint = " or leave it out (None)" if allow_none else ""
        raise ConfigError(f"{name}={value!r} is invalid; pass a positive integer such as {example}{hint}.")
    check_size_bound(value, name)


def check_size_bound(value: int, name: str) -> None:
    if value > MAX_SIZE:
        raise ConfigError(
            f"{name}={value} is larger than any tensor dimension ({MAX_SIZE:,}); an untrusted or damaged config? "
            "Use a realistic size (ranks are typically 4 to 256, num_virtual_tokens 8 to 100)."
        )


def check_positive_number(value: Any, name: str) -> None:
    check_finite(value, name)
    if not value > 0:
        raise ConfigError(f"{name}={value!r} is invalid; it must be a number > 0 (commonly 2 * r).")


def check_finite(value: Any, name: str) -> None:
    """A number (not a bool) that is finite: Infinity / NaN (valid in peft's JSON) are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is invalid; it must be a finite number.")


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
    for key in value:
        compile_config_regex(key, f"{name} key")
    return value


def check_layer_indices(value: Any, name: str = "layers_to_transform") -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return
    raise ConfigError(f"{name}={value!r} is invalid; pass a layer index or a list of indices, e.g. [0, 1].")
