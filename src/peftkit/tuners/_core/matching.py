"""Which modules a config targets: names, regexes, layer indices, per-module patterns.

Rules (the same as peft's, so a config selects the same modules in both libraries):
- a list of names matches a module whose dotted path equals a name or ends with `.name`;
- a string is a regex that must match the whole dotted path;
- `exclude_modules` uses the same rules and wins over `target_modules`;
- `layers_to_transform` keeps only modules under `<layers_pattern>.<index>.`.

Regexes come from (possibly untrusted) configs: each is compiled once by `safe_regex`, which turns
an invalid or catastrophically backtracking pattern into a ConfigError naming the field.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from torch import nn

from ...utils.constants import COMMON_LAYERS_PATTERN
from ...utils.safe_regex import compile_config_regex

NamePatterns = Union[str, Iterable[str]]


def key_matches(key: str, names: Optional[NamePatterns], field: str = "target_modules") -> bool:
    """True if the module path `key` is selected by `names` (list of suffixes or a full regex).

    `field` names the config field in the ConfigError for a bad regex.
    """
    if names is None:
        return False
    if isinstance(names, str):
        return compile_config_regex(names, field).fullmatch(key) is not None
    return any(key == name or key.endswith("." + name) for name in names)


def layer_index(key: str, layers_pattern: Optional[NamePatterns]) -> Optional[int]:
    """The block index in `key` (e.g. 3 in `model.layers.3.self_attn.q_proj`, or in the block's own
    key `model.layers.3`, which ShadowPEFT targets), or None."""
    if layers_pattern is None:
        patterns: Iterable[str] = COMMON_LAYERS_PATTERN
    elif isinstance(layers_pattern, str):
        patterns = [layers_pattern]
    else:
        patterns = layers_pattern
    for pattern in patterns:
        match = re.match(rf"(?:^|.*\.){re.escape(pattern)}\.(\d+)(?:\.|$)", key)
        if match:
            return int(match.group(1))
    return None


def is_targeted(config: Any, key: str) -> bool:
    """Apply `target_modules`, `exclude_modules` and `layers_to_transform` of `config` to `key`."""
    if key_matches(key, getattr(config, "exclude_modules", None), "exclude_modules"):
        return False
    if not key_matches(key, config.target_modules):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None:
        return True
    wanted = [layers] if isinstance(layers, int) else list(layers)
    return layer_index(key, getattr(config, "layers_pattern", None)) in wanted


def pattern_value(patterns: Mapping[str, Any], key: str, default: Any, field: str = "rank_pattern/alpha_pattern") -> Any:
    """The value of the first `patterns` entry whose regex matches the end of `key` (rank_pattern etc.)."""
    pattern = matching_pattern(patterns, key, field)
    return default if pattern is None else patterns[pattern]


def matching_pattern(patterns: Mapping[str, Any], key: str, field: str = "rank_pattern/alpha_pattern") -> Optional[str]:
    """The first of `patterns` (regexes, rank_pattern-style) that matches the end of `key`, or None."""
    for pattern in patterns:
        compile_config_regex(pattern, f"{field} key")  # refuses a bad or catastrophic key first
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def describe_unmatched(targets: Any, model: nn.Module, config: Any = None) -> str:
    """One message for target_modules that matched nothing: what exists and what is close.

    A regex is shown as the regex it is; when `config`'s exclude_modules / layers_to_transform /
    layers_pattern removed every module target_modules selects, the message says so.
    """
    leaf_names = sorted({name.rpartition(".")[2] for name, _ in model.named_modules() if name})
    shown = leaf_names if len(leaf_names) <= 40 else leaf_names[:40] + ["..."]
    if isinstance(targets, str):
        what = f"target_modules regex {targets!r} (it must match the whole dotted module path, e.g. r'.*\\.q_proj')"
        hint = ""
    else:
        wanted = sorted(targets or [])
        what = f"target_modules {wanted!r}"
        close = list(dict.fromkeys(m for t in wanted for m in difflib.get_close_matches(str(t), leaf_names, n=3, cutoff=0.6)))
        hint = f" Close matches: {close}." if close else ""
    filters = _filter_note(targets, model, config)
    return (
        f"{what} matched no module of {type(model).__name__}.{filters}{hint} "
        f"Module names in this model: {shown}. Pass some of these names, a regex, or 'all-linear'."
    )


def _filter_note(targets: Any, model: nn.Module, config: Any) -> str:
    """Which of exclude_modules / layers_to_transform / layers_pattern were set, and whether they removed the matches."""
    if config is None:
        return ""
    fields = {
        name: getattr(config, name, None)
        for name in ("exclude_modules", "layers_to_transform", "layers_pattern")
        if getattr(config, name, None) not in (None, [], set())
    }
    if not fields:
        return ""
    before = sum(1 for name, _ in model.named_modules() if name and key_matches(name, targets))
    settings = ", ".join(f"{name}={sorted(v) if isinstance(v, set) else v!r}" for name, v in fields.items())
    if before:
        return (
            f" target_modules alone selects {before} module(s), but {settings} removed all of them; "
            f"relax {' / '.join(fields)}."
        )
    return f" (Also set: {settings}, which may exclude modules too.)"
