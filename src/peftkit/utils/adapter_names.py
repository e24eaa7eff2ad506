"""Adapter names become folder names and `ModuleDict` keys: reject unsafe ones up front."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import AdapterNameError

#: Reserved for "no adapter" in mixed-adapter batches.
BASE_ADAPTER_NAME = "__base__"

#: Longest adapter name: it must fit in a folder name (and a path) on every file system.
MAX_ADAPTER_NAME_CHARS = 100

_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-]+")  # used with fullmatch: no trailing "\n" slips through

#: An instance, so instance attributes (`training`, `_modules`, `_parameters`, ...) are seen too:
#: `ModuleDict[name] = ...` refuses a key that is an attribute of the dict.
_PROBE = nn.ModuleDict()


def validate_adapter_name(name: object) -> str:
    """Return `name` if it is safe as a folder and module key, else raise `AdapterNameError`.

    Allowed: letters, digits, `_` and `-`, at most MAX_ADAPTER_NAME_CHARS of them. Path separators,
    `..`, dots (module paths use them), whitespace (a trailing newline too), the empty string and
    names of `torch.nn.Module` / `ModuleDict` attributes (`training`, `_modules`, `forward`, ...) are
    refused before any file or module is touched.
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"Adapter name {name!r} is empty or not a string; use e.g. 'default'.")
    if len(name) > MAX_ADAPTER_NAME_CHARS:
        raise AdapterNameError(
            f"Adapter name {name[:20]!r}... has {len(name)} characters; the limit is {MAX_ADAPTER_NAME_CHARS} "
            "(it becomes a folder name when saved). Pick a shorter name."
        )
    if name == BASE_ADAPTER_NAME:
        raise AdapterNameError(f"Adapter name {name!r} is reserved for 'no adapter'; pick another name.")
    if hasattr(_PROBE, name):  # class attributes of Module / ModuleDict and the instance's own
        raise AdapterNameError(
            f"Adapter name {name!r} clashes with a torch.nn.Module attribute; pick another name, e.g. {name.strip('_') + '_adapter'!r}."
        )
    if not _SAFE_NAME.fullmatch(name):
        raise AdapterNameError(
            f"Adapter name {name!r} is unsafe (only letters, digits, '_' and '-' are allowed, "
            "no path separators, dots or '..'); rename it, e.g. to "
            f"{re.sub(r'[^A-Za-z0-9_-]+', '_', name).strip('_') or 'adapter'!r}."
        )
    return name


def adapter_name_list(adapter_name: Any, available: Any = ()) -> list[str]:
    """`set_adapter`'s argument as a list of names: one name, or a list / tuple of names.

    Anything else (None, a number, a list holding a non-string) is an `AdapterNameError` listing
    the adapters `available`, instead of a TypeError from iterating it. (An empty list stays
    allowed: it is what a model whose last adapter was deleted re-activates.)
    """
    if isinstance(adapter_name, str):
        return [adapter_name]
    if isinstance(adapter_name, (list, tuple)) and all(isinstance(n, str) for n in adapter_name):
        return list(adapter_name)
    raise AdapterNameError(
        f"set_adapter needs an adapter name or a list of names, got {adapter_name!r}; "
        f"this model has {sorted(available)}. To run without adapters use `with model.disable_adapter():`."
    )
