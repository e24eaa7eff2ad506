"""Finding and replacing sub-modules by their dotted names."""

from __future__ import annotations

from typing import Optional

from torch import nn


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """Return `(parent, target, target_name)` for the module at dotted path `key`."""
    parent_key, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    return parent, model.get_submodule(key), target_name


def replace_module(parent: nn.Module, child_name: str, new_module: nn.Module) -> None:
    """Put `new_module` where `parent.<child_name>` was."""
    setattr(parent, child_name, new_module)


def input_embedding_name(model: nn.Module) -> Optional[str]:
    """The module path of `model.get_input_embeddings()` (transformers models), else None."""
    if not hasattr(model, "get_input_embeddings"):
        return None
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((name for name, module in model.named_modules() if module is embeddings), None)


def tied_module_names(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Modules whose weight is the embedding's (an output layer under `tie_word_embeddings`)."""
    config = getattr(model, "config", None)  # transformers' switch for tying input and output embeddings
    if not getattr(config, "tie_word_embeddings", False):
        return []
    weight = embedding.weight
    return [
        name
        for name, module in model.named_modules()
        if module is not embedding and isinstance(module, nn.Linear) and module.weight is weight
    ]
