"""Which modules a config targets: names, regexes, layer indices, per-module patterns.

Rules (the same as peft's, so a config selects the same modules in both libraries):
- a list of names matches a module whose dotted path equals a name or ends with `.name`;
- a string is a regex that must match the whole dotted path;
- `exclude_modules` uses the same rules and wins over `target_modules`;
- `layers_to_transform` keeps only modules under `<layers_pattern>.<index>.`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from torch import nn

from ...utils.constants import COMMON_LAYERS_PATTERN

NamePatterns = Union[str, Iterable[str]]


def key_matches(key: str, names: Optional[NamePatterns]) -> bool:
    """True if the module path `key` is selected by `names` (list of suffixes or a full regex)."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith("." + name) for name in names)


def layer_index(key: str, layers_pattern: Optional[NamePatterns]) -> Optional[int]:
    """The block index in `key` (e.g. 3 in `model.layers.3.self_attn.q_proj`), or None."""
    if layers_pattern is None:
        patterns: Iterable[str] = COMMON_LAYERS_PATTERN
    elif isinstance(layers_pattern, str):
        patterns = [layers_pattern]
    else:
        patterns = layers_pattern
    for pattern in patterns:
        match = re.match(rf"(?:^|.*\.){re.escape(pattern)}\.(\d+)\.", key)
        if match:
            return int(match.group(1))
    return None


def is_targeted(config: Any, key: str) -> bool:
    """Apply `target_modules`, `exclude_modules` and `layers_to_transform` of `config` to `key`."""
    if key_matches(key, getattr(config, "exclude_modules", None)):
        return False
    if not key_matches(key, config.target_modules):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None:
        return True
    wanted = [layers] if isinstance(layers, int) else list(layers)
    return layer_index(key, getattr(config, "layers_pattern", None)) in wanted


def pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value of the first `patterns` entry whose regex matches the end of `key` (rank_pattern etc.)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def describe_unmatched(targets: Any, model: nn.Module) -> str:
    """One message for target_modules that matched nothing: what exists and what is close."""
    leaf_names = sorted({name.rpartition(".")[2] for name, _ in model.named_modules() if name})
    wanted = [targets] if isinstance(targets, str) else sorted(targets or [])
    close = list(dict.fromkeys(m for t in wanted for m in difflib.get_close_matches(str(t), leaf_names, n=3, cutoff=0.6)))
    hint = f" Close matches: {close}." if close else ""
    shown = leaf_names if len(leaf_names) <= 40 else leaf_names[:40] + ["..."]
    return (
        f"target_modules {wanted!r} matched no module of {type(model).__name__}.{hint} "
        f"Module names in this model: {shown}. Pass some of these names, a regex, or 'all-linear'."
    )
