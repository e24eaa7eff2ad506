"""Adapter names become folder names and `ModuleDict` keys: reject unsafe ones up front."""

from __future__ import annotations

import re

from torch import nn

from ..errors import AdapterNameError

#: Reserved for "no adapter" in mixed-adapter batches.
BASE_ADAPTER_NAME = "__base__"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def validate_adapter_name(name: object) -> str:
    """Return `name` if it is safe as a folder and module key, else raise `AdapterNameError`.

    Allowed: letters, digits, `_` and `-`. Path separators, `..`, dots (module paths use them),
    whitespace and the empty string are refused before any file or module is touched.
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"Adapter name {name!r} is empty or not a string; use e.g. 'default'.")
    if name == BASE_ADAPTER_NAME:
        raise AdapterNameError(f"Adapter name {name!r} is reserved for 'no adapter'; pick another name.")
    if hasattr(nn.Module, name) or hasattr(nn.ModuleDict, name):
        raise AdapterNameError(
            f"Adapter name {name!r} clashes with a torch.nn.Module attribute; pick another name, e.g. {name + '_adapter'!r}."
        )
    if not _SAFE_NAME.match(name):
        raise AdapterNameError(
            f"Adapter name {name!r} is unsafe (only letters, digits, '_' and '-' are allowed, "
            "no path separators, dots or '..'); rename it, e.g. to "
            f"{re.sub(r'[^A-Za-z0-9_-]+', '_', name).strip('_') or 'adapter'!r}."
        )
    return name
