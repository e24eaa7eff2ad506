"""Finding and replacing sub-modules by their dotted names."""

from __future__ import annotations

from torch import nn


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """Return `(parent, target, target_name)` for the module at dotted path `key`."""
    parent_key, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    return parent, model.get_submodule(key), target_name


def replace_module(parent: nn.Module, child_name: str, new_module: nn.Module) -> None:
    """Put `new_module` where `parent.<child_name>` was."""
    setattr(parent, child_name, new_module)
