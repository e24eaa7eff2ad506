"""The registry: the one place outside a method's folder where a method is known.

Each built-in method declares itself as `METHOD = MethodSpec(...)` in its own package,
`peftkit/tuners/<peft_type.lower()>/__init__.py`. Nothing registers on import: `method_spec("IA3")`
imports `peftkit.tuners.ia3` the first time it is asked for and reads its `METHOD`. Third-party
methods call `register_method(...)` explicitly; a peft_type is taken once.

What the shared code reads from a spec (so it never names a method):

- `config_cls` / `tuner_cls`: `get_peft_model`, `PeftConfig.from_pretrained`, the loaders;
- `prefix`: how the method's checkpoint keys start after the module path (`...q_proj.lora_A.weight`),
  or the whole key of a prompt-learning table (`prompt_embeddings`) -- `peftkit inspect`;
- `cli_names`, `cli_defaults`, `cli_preset`: the CLI's method names and config defaults;
- `capabilities`: which optional features the method implements (see `CAPABILITIES`);
- `fsdp_wrap_classes`: modules that get their own FSDP unit (the prompt encoders);
- `default_targets`: `config.model_type` -> target_modules used when the config names none;
- `rank_dims`: checkpoint-key suffix -> dimension that holds the rank (`peftkit inspect` checks `r`);
- `display_name`: how error messages name the method.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import PeftConfig

#: `merge_adapter` / `merge_and_unload` fold the adapter into the base weights (outputs unchanged).
MERGE = "merge"
#: `model(..., adapter_names=[...])` picks an adapter per row of the batch.
MIXED_BATCH = "mixed_batch"
#: The tuner has `add_weighted_adapter` (a new adapter combined from existing ones).
WEIGHTED_COMBINATION = "weighted_combination"
#: The method's layers wrap quantized linear bases (peftkit's and bitsandbytes'); merging requantizes.
QUANTIZED_BASE = "quantized_base"
CAPABILITIES = frozenset({MERGE, MIXED_BATCH, WEIGHTED_COMBINATION, QUANTIZED_BASE})

#: A `cli_defaults` value replaced by the run's number of optimizer steps (e.g. AdaLoRA's `total_step`).
TRAIN_STEPS = "<number of optimizer steps>"

_TUNERS_PACKAGE = "peftkit.tuners"


@dataclass(frozen=True)
class MethodSpec:
    """What the code outside a method's folder knows about the method."""

    peft_type: str
    config_cls: type
    tuner_cls: type
    #: Checkpoint-key prefix of the method's tensors; the tuner's attribute prefix when not given.
    prefix: str = ""
    cli_names: tuple[str, ...] = ()
    #: Config values the CLI adds when the user leaves them out (peft requires them or has no model default).
    cli_defaults: Mapping[str, Any] = field(default_factory=dict)
    #: Config values `peftkit train` uses when the user gives no method option at all.
    cli_preset: Mapping[str, Any] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    fsdp_wrap_classes: tuple[type, ...] = ()
    #: `config.model_type` -> default target_modules; the tuner's `default_target_modules` when not given.
    default_targets: Optional[Mapping[str, Any]] = None
    rank_dims: Mapping[str, int] = field(default_factory=dict)
    #: How messages name the method ("AdaLoRA"); the tuner's `display_name`, else the peft_type, when not given.
    display_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "peft_type", _key(self.peft_type))
        object.__setattr__(self, "cli_names", tuple(self.cli_names))
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))
        object.__setattr__(self, "fsdp_wrap_classes", tuple(self.fsdp_wrap_classes))
        # One source for what the tuner declares already: the spec reads it from the tuner class.
        object.__setattr__(self, "prefix", self.prefix or getattr(self.tuner_cls, "prefix", ""))
        object.__setattr__(
            self, "display_name", self.display_name or getattr(self.tuner_cls, "display_name", "") or self.peft_type
        )
        if self.default_targets is None:
            object.__setattr__(self, "default_targets", getattr(self.tuner_cls, "default_target_modules", {}))
        unknown = sorted(self.capabilities - CAPABILITIES)
        if unknown:
            raise ConfigError(
                f"MethodSpec {self.peft_type!r} declares unknown capabilities {unknown}; "
                f"choose from {sorted(CAPABILITIES)}."
            )
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigError(f"MethodSpec {self.peft_type!r} needs a non-empty checkpoint-key prefix, got {self.prefix!r}.")

    def __hash__(self) -> int:
        return hash(self.peft_type)

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that learn virtual tokens (their tuner's flag) instead of wrapping layers."""
        return bool(getattr(self.tuner_cls, "is_prompt_learning", False))


_REGISTERED: dict[str, MethodSpec] = {}  # third-party methods, by explicit register_method
_BUILTIN: dict[str, MethodSpec] = {}  # built-in methods, read from their folder on first use
_BUILTIN_TYPES: tuple[str, ...] | None = None


def _key(peft_type: Any) -> str:
    return str(getattr(peft_type, "value", peft_type))


def _builtin_types() -> tuple[str, ...]:
    """PeftType values that have a method folder `peftkit/tuners/<value.lower()>`, in enum order (found once)."""
    global _BUILTIN_TYPES
    if _BUILTIN_TYPES is None:
        from .utils.peft_types import PeftType

        _BUILTIN_TYPES = tuple(
            member.value for member in PeftType if importlib.util.find_spec(f"{_TUNERS_PACKAGE}.{member.value.lower()}")
        )
    return _BUILTIN_TYPES


def _builtin_spec(key: str) -> MethodSpec | None:
    """The `METHOD` of the built-in method `key` (imported on first use), or None."""
    if key in _BUILTIN:
        return _BUILTIN[key]
    if key not in _builtin_types():
        return None
    module = importlib.import_module(f"{_TUNERS_PACKAGE}.{key.lower()}")
    spec = getattr(module, "METHOD", None)
    if not isinstance(spec, MethodSpec) or spec.peft_type != key:
        raise ConfigError(f"{module.__name__} must declare METHOD = MethodSpec(peft_type={key!r}, ...).")
    _BUILTIN[key] = spec
    return spec


def register_method(
    method: Any, config_cls: type | None = None, tuner_cls: type | None = None, prefix: str | None = None, **fields: Any
) -> MethodSpec:
    """Make a third-party method known to `get_peft_model`, `PeftConfig.from_pretrained`, the loaders and the CLI.

    Pass a `MethodSpec`, or its fields: `register_method("MYMETHOD", MyConfig, MyTuner, prefix="my_",
    cli_names=("my",), capabilities={"merge"})`. A peft_type registers once (built-in ones are taken):
    a second registration would silently replace the first method, so it is refused.
    """
    if isinstance(method, MethodSpec) and (config_cls, tuner_cls, prefix, fields) != (None, None, None, {}):
        raise ConfigError("register_method takes a MethodSpec or its fields, not both.")
    key = method.peft_type if isinstance(method, MethodSpec) else _key(method)
    taken = _REGISTERED.get(key) or _builtin_spec(key)
    if taken is not None:
        raise ConfigError(
            f"peft_type {key!r} is registered already (config {taken.config_cls.__name__}, tuner "
            f"{taken.tuner_cls.__name__}); register the new method under a peft_type of its own."
        )
    spec = method if isinstance(method, MethodSpec) else MethodSpec(key, config_cls, tuner_cls, prefix, **fields)  # type: ignore[arg-type]
    clashes = sorted(set(spec.cli_names) & {name for other in registered_methods() for name in other.cli_names})
    if clashes:
        raise ConfigError(f"CLI name(s) {clashes} of {spec.peft_type!r} belong to another method; pick other cli_names.")
    _REGISTERED[spec.peft_type] = spec
    return spec


def method_spec(peft_type: Any) -> MethodSpec:
    """Look up a method (built-in: imported on first use), with a clear error listing the known ones."""
    key = _key(peft_type)
    spec = _REGISTERED.get(key) or _builtin_spec(key)
    if spec is None:
        known = ", ".join(sorted({*_builtin_types(), *_REGISTERED}))
        raise ConfigError(f"Unknown peft_type {peft_type!r}; peftkit supports: {known}.")
    return spec


def config_class_for(peft_type: Any) -> "type[PeftConfig]":
    return method_spec(peft_type).config_cls


def registered_methods() -> list[MethodSpec]:
    """Every built-in method (in `PeftType` order; this imports them) and then every registered one."""
    builtin = [_builtin_spec(key) for key in _builtin_types()]
    return [spec for spec in builtin if spec is not None] + list(_REGISTERED.values())
