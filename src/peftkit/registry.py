"""Declarative registry of PEFT methods: peft_type -> (config class, tuner class).

Each method folder registers itself on import (`register_method(...)` at the bottom of its
`model.py`), so the wrappers, the loaders and the CLI never list methods by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import PeftConfig


@dataclass(frozen=True)
class MethodSpec:
    """What peftkit needs to know about one method."""

    peft_type: str
    config_cls: type
    tuner_cls: type
    prefix: str  # name prefix of the method's adapter attributes, e.g. "lora_"


_METHODS: dict[str, MethodSpec] = {}


def register_method(peft_type: Any, config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Make a method known to `get_peft_model`, `PeftConfig.from_pretrained` and the loaders.

    A peft_type registers once: a second registration would silently replace the first method.
    """
    key = str(getattr(peft_type, "value", peft_type))
    if key in _METHODS:
        taken = _METHODS[key]
        raise ConfigError(
            f"peft_type {key!r} is registered already (config {taken.config_cls.__name__}, tuner "
            f"{taken.tuner_cls.__name__}); register the new method under a peft_type of its own."
        )
    _METHODS[key] = MethodSpec(key, config_cls, tuner_cls, prefix)


def method_spec(peft_type: Any) -> MethodSpec:
    """Look up a registered method, with a clear error listing the known ones."""
    key = str(getattr(peft_type, "value", peft_type))
    if key not in _METHODS:
        known = ", ".join(sorted(_METHODS))
        raise ConfigError(f"Unknown peft_type {peft_type!r}; peftkit supports: {known}.")
    return _METHODS[key]


def config_class_for(peft_type: Any) -> "type[PeftConfig]":
    return method_spec(peft_type).config_cls


def registered_methods() -> list[MethodSpec]:
    return list(_METHODS.values())
