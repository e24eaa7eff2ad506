"""The base model's own weights under its original keys, read from and written into a PeftModel.

Injecting adapters renames the base model's tensors (`q_proj.weight` becomes
`q_proj.base_layer.weight`, a saved head `classifier.weight` becomes
`classifier.original_module.weight`) and adds adapter tensors beside them. `get_base_model_state_dict`
undoes both: it drops every adapter tensor and removes the wrapper infixes, so the result has
exactly the keys of the model before `get_peft_model`; `set_base_model_state_dict` loads such a
state dict back (e.g. base weights restored after FSDP wrapping).

Keys are translated by walking the live module tree, not by string replacement: a segment is
removed only where it is a wrapper's `base_layer` / `original_module`, so a user's module that
happens to be called `base_layer` keeps its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..tuners._core.layer import BaseTunerLayer
from ..tuners._core.modules_to_save import AuxiliaryWrapper

if TYPE_CHECKING:  # state_dict re-exports this module's functions: import it lazily
    from .state_dict import IncompatibleKeys


def _inner_model(model: nn.Module) -> nn.Module:
    """The user's module tree of a PeftModel (or of a tuner, or a model with injected adapters)."""
    from ..tuners._core.tuner import BaseTuner

    base = model.__dict__.get("_modules", {}).get("base_model")
    if isinstance(base, BaseTuner):
        return base.model
    if isinstance(model, BaseTuner):
        return model.model
    return model


def _original_key(root: nn.Module, key: str) -> Optional[str]:
    """`key` of `root.state_dict()` under the model's original naming, or None for an adapter tensor."""
    kept: list[str] = []
    current: Optional[nn.Module] = root
    for part in key.split("."):
        if current is None:  # past the module tree (a nested parameter name)
            kept.append(part)
            continue
        child = current._modules.get(part)
        if isinstance(current, BaseTunerLayer):
            if part != "base_layer":
                return None  # the adapter's own tensors and settings
            current = child
            continue
        if isinstance(current, AuxiliaryWrapper):
            if part != current.base_attribute:
                return None  # the per-adapter trainable copies / rows
            current = child
            continue
        kept.append(part)
        current = child  # None for a parameter / buffer name
    return ".".join(kept)


def _key_map(root: nn.Module) -> dict[str, str]:
    """original key -> key in `root.state_dict()`, for every base-model tensor."""
    mapping: dict[str, str] = {}
    for key in root.state_dict(keep_vars=True):
        original = _original_key(root, key)
        if original is not None:
            mapping[original] = key
    return mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with its original keys: adapter tensors left out, wrapper infixes removed.

    `model` is a PeftModel (any method; prompt learning leaves the base model's keys as they were).
    The tensors are the live ones (as `state_dict()` returns them), not copies.
    """
    root = _inner_model(model)
    state = root.state_dict()
    return {original: state[key] for original, key in _key_map(root).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> "IncompatibleKeys":
    """Load a state dict keyed as the original model into the base model of a PeftModel.

    The inverse of `get_base_model_state_dict`; adapter tensors are not touched. Returns
    `(missing_keys, unexpected_keys)` in original keys; with `strict=True` either raises
    `RuntimeError` (as `nn.Module.load_state_dict` and peft do) and nothing is loaded.
    """
    from .state_dict import IncompatibleKeys

    root = _inner_model(model)
    mapping = _key_map(root)
    unexpected = [key for key in state_dict if key not in mapping]
    missing = [key for key in mapping if key not in state_dict]
    if strict and (missing or unexpected):
        messages = []
        if missing:
            messages.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            messages.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(messages))
    translated = {mapping[key]: value for key, value in state_dict.items() if key in mapping}
    root.load_state_dict(translated, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
