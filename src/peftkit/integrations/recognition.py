"""Make transformers' `Trainer` treat a peftkit model as it treats a peft model, with user code unchanged.

transformers recognises adapters by class (transformers 5.23 / 5.24):

    transformers.trainer_utils._is_peft_model   isinstance(model, (peft.PeftModel, peft.PeftMixedModel))
        (imported by name into transformers.trainer and transformers.integrations.neftune)
    Trainer._save                               save_pretrained() only for PreTrainedModel / peft.PeftModel;
                                                anything else: the *whole* state dict as model.safetensors
    Trainer._load_from_checkpoint, _load_best_model    adapter folders only for `_is_peft_model` models

so a peftkit model would be checkpointed in full (frozen base included: ~14 GB per save for a 7B
model) and could not resume from an adapter folder. `install()` (run on `import peftkit`) patches
those points, once per process and only for peftkit models -- anything else, peft's models
included, goes to the original code unchanged:

- each module's `_is_peft_model` also answers True for a peftkit `PeftModel`;
- `Trainer._save`, `_load_from_checkpoint`, `_load_best_model` and `train` go through
  `trainer.py`'s adapter-only checkpoint functions for peftkit models;
- TRL's modules (`trl.*`): their peft names accept peftkit's classes, `get_peft_model` builds a
  peftkit model for a peftkit config, `is_peft_model` recognises peftkit models; without peft
  installed, peftkit provides those names and TRL's `is_peft_available` answers True;
- transformers' adapter API on a base model (`model.load_adapter(path)`, `add_adapter`, ...) is
  done by peftkit (`adapter_api.py`) where transformers cannot use peft (absent or too old).

A module imported later is patched when it is imported (a `sys.meta_path` hook). Where the patch
cannot apply -- an unknown transformers layout, or a Trainer subclass that overrides `_save` itself --
creating the trainer warns once, loudly, with what to do instead: never a silent full checkpoint.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType
from typing import Any, Callable, Optional

#: Modules holding their own reference to `_is_peft_model`.
PEFT_CHECK_MODULES = ("transformers.trainer_utils", "transformers.trainer", "transformers.integrations.neftune")
TRAINER_MODULE = "transformers.trainer"
#: The Trainer methods routed to peftkit's checkpoint functions for peftkit models.
TRAINER_METHODS = ("_save", "_load_from_checkpoint", "_load_best_model", "train", "__init__")
WATCHED = frozenset(PEFT_CHECK_MODULES + ("transformers.integrations.peft",))
#: TRL modules (any `trl.*`) are patched too: their module-level peft names (below) learn peftkit's classes.
WATCHED_PREFIXES = ("trl.",)
_MARK = "__peftkit_recognition__"
_lock = threading.Lock()
_warned: set[str] = set()


def install() -> None:
    """Patch the detection points in the modules already imported; patch the others on import. Idempotent."""
    with _lock:
        for name, module in list(sys.modules.items()):
            if module is not None and _watched(name):
                _patch(module)
        if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport())


def is_installed(module_name: str = TRAINER_MODULE) -> bool:
    """Whether `module_name` (imported) carries the patch; for tests and diagnostics."""
    module = sys.modules.get(module_name)
    check = getattr(module, "_is_peft_model", None)
    return bool(getattr(check, _MARK, False))


def is_peftkit_model(model: Any) -> bool:
    """A peftkit `PeftModel`, possibly wrapped by DDP/FSDP/compile (`.module` / `._orig_mod`)."""
    from ..peft_model import PeftModel

    for _ in range(4):
        if isinstance(model, PeftModel):
            return True
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return False
    return False


# ---------------------------------------------------------------------- patching
def _watched(name: str) -> bool:
    return name in WATCHED or name.startswith(WATCHED_PREFIXES)


def _patch(module: ModuleType) -> None:
    for check in ("_is_peft_model", "is_peft_model"):
        original = getattr(module, check, None)
        if callable(original) and not getattr(original, _MARK, False):
            setattr(module, check, _recognising(original))
    if module.__name__.startswith(WATCHED_PREFIXES):
        _patch_trl(module)
    if module.__name__ == ADAPTER_API_MODULE:
        _patch_adapter_api(module)
    if module.__name__ == TRAINER_MODULE:
        trainer_cls = getattr(module, "Trainer", None)
        if trainer_cls is None or not all(hasattr(trainer_cls, name) for name in TRAINER_METHODS):
            _warn_once(
                "layout",
                "peftkit: this transformers version has no Trainer._save / _load_from_checkpoint / _load_best_model "
                "as peftkit knows them, so Trainer would checkpoint peftkit models in full. Save adapters with "
                "model.save_pretrained(dir) and use transformers 5.23-5.24 for Trainer integration.",
            )
            return
        for name in TRAINER_METHODS:
            current = getattr(trainer_cls, name)
            if not getattr(current, _MARK, False):
                setattr(trainer_cls, name, _routed(current, "routed" + name if name.startswith("_") else "routed_" + name))


def _patch_trl(module: ModuleType) -> None:
    """A TRL module: `isinstance(x, PeftConfig)` etc. accept peftkit's classes, `get_peft_model` builds a
    peftkit model for a peftkit config. Only names the module already has are touched."""
    import peftkit

    from ..tuners._core.layer import BaseTunerLayer
    from ..tuners._prompt.config import PromptLearningConfig

    ours = {
        "PeftConfig": peftkit.PeftConfig,
        "PeftModel": peftkit.PeftModel,
        "PrefixTuningConfig": peftkit.PrefixTuningConfig,
        "PromptLearningConfig": PromptLearningConfig,
        "BaseTunerLayer": BaseTunerLayer,
    }
    for name, cls in ours.items():
        theirs = module.__dict__.get(name)
        if isinstance(theirs, type) and not getattr(theirs, _MARK, False):
            module.__dict__[name] = _either(theirs, cls)
    original = module.__dict__.get("get_peft_model")
    if callable(original) and not getattr(original, _MARK, False):
        module.__dict__["get_peft_model"] = _building(original)
    if "is_peft_available" in module.__dict__ and not _peft_installed():
        # Without peft, TRL skipped `from peft import ...` and refuses `peft_config=`: peftkit takes its place.
        module.__dict__["is_peft_available"] = _peftkit_available
        for name, cls in {**ours, "LoraConfig": peftkit.LoraConfig}.items():
            module.__dict__.setdefault(name, cls)
        module.__dict__.setdefault("get_peft_model", peftkit.get_peft_model)
        module.__dict__.setdefault("peft", peftkit)


def _peft_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):
        return False


def _peftkit_available() -> bool:
    """TRL's `is_peft_available` where peft is not installed: peftkit provides what TRL uses from it."""
    return True


setattr(_peftkit_available, _MARK, True)


def _either(theirs: type, ours: type) -> type:
    """A class that `isinstance` / `issubclass` answer for instances of either (TRL's checks use it so)."""

    class _Meta(type):
        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, (theirs, ours))

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, (theirs, ours))

    either = _Meta(theirs.__name__, (), {"__doc__": f"{theirs.__module__}.{theirs.__name__} or peftkit's", _MARK: True})
    either.__module__ = theirs.__module__
    return either


def _building(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_peft_model(model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        import peftkit

        if isinstance(peft_config, peftkit.PeftConfig):
            return peftkit.get_peft_model(model, peft_config, *args, **kwargs)
        return original(model, peft_config, *args, **kwargs)

    setattr(get_peft_model, _MARK, True)
    return get_peft_model


def _recognising(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    @functools.wraps(original)
    def _is_peft_model(model: Any) -> bool:
        return original(model) or is_peftkit_model(model)

    setattr(_is_peft_model, _MARK, True)
    return _is_peft_model


def _routed(original: Callable[..., Any], impl_name: str) -> Callable[..., Any]:
    """A Trainer method that calls `integrations.trainer.<impl_name>(trainer, original, ...)`, which
    handles peftkit models and hands everything else to `original`. Looked up per call: that module
    imports transformers.trainer, whose import is what runs this patch."""

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        from . import trainer as adapter_checkpoints

        return getattr(adapter_checkpoints, impl_name)(self, original, *args, **kwargs)

    setattr(method, _MARK, True)
    return method


def warn_unrecognised(trainer: Any) -> None:
    """Called when a Trainer is built for a peftkit model: warn if its class bypasses the patched `_save`."""
    if getattr(type(trainer)._save, _MARK, False):
        return
    _warn_once(
        f"save:{type(trainer).__qualname__}",
        f"peftkit: {type(trainer).__name__} overrides Trainer._save, so peftkit cannot make its checkpoints "
        "adapter-only: they may hold the whole model (frozen base included). Save the adapter with "
        "model.save_pretrained(dir), or subclass transformers.Trainer without overriding _save.",
    )


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the watched modules right after they are executed (imported later than peftkit)."""

    def find_spec(self, fullname: str, path: Optional[Any], target: Optional[ModuleType] = None) -> Any:
        if not _watched(fullname):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            with _lock:
                _patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


# ---------------------------------------------------------------------- transformers' adapter API on a base model
ADAPTER_API_MODULE = "transformers.integrations.peft"


def _peft_usable(min_version: str) -> bool:
    """Whether transformers can use the installed peft for its adapter API (installed, new enough)."""
    from importlib import metadata

    from packaging.version import Version

    try:
        return Version(metadata.version("peft")) >= Version(min_version)
    except metadata.PackageNotFoundError:
        return False


def _patch_adapter_api(module: ModuleType) -> None:
    """`model.load_adapter(path)`, `add_adapter`, `set_adapter`, ... of transformers' `PeftAdapterMixin`,
    done with peftkit where transformers cannot use peft (absent, or older than it asks for: 5.24 asks
    for peft >= 0.22). With a usable peft installed, transformers' own code stays."""
    mixin = getattr(module, "PeftAdapterMixin", None)
    if mixin is None or getattr(mixin, _MARK, False) or _peft_usable(getattr(module, "MIN_PEFT_VERSION", "0")):
        return
    from . import adapter_api

    for name in adapter_api.METHODS:
        setattr(mixin, name, getattr(adapter_api, name))
    setattr(mixin, _MARK, True)
