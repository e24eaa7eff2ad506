"""`BaseTuner`: injects a method's layers into any `nn.Module` by module name, and manages them.

A method subclasses it and supplies three things: `prefix` (its attribute prefix, e.g. "lora_"),
`default_target_modules` (per `config.model_type`) and `_create_and_replace` (wrap one module).
Everything else -- matching, several named adapters, switching, disabling, merging, unloading,
and rolling back a failed injection -- lives here, once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import AdapterNameError, AdapterStateError, ConfigError, TargetModulesError
from ...utils.adapter_names import validate_adapter_name
from .layer import BaseTunerLayer
from .matching import describe_unmatched, is_targeted, key_matches
from .module_tree import get_submodules, replace_module
from .modules_to_save import ModulesToSaveWrapper

AdapterLike = Union[BaseTunerLayer, ModulesToSaveWrapper]


class BaseTuner(nn.Module):
    """Holds the wrapped model (`self.model`) and the configs of its adapters (`self.peft_config`)."""

    prefix: ClassVar[str] = ""
    default_target_modules: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default", **_: Any) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.targeted_module_names: list[str] = []
        self.active_adapter: Union[str, list[str]] = adapter_name
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.add_adapter(name, config)
        self.set_adapter(adapter_name)
        # As peft: the injected model carries its configs (read by `get_peft_model_state_dict`).
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        """Attributes the tuner lacks come from the wrapped model (`.config`, `.generate`, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ hooks for methods
    def _create_and_replace(
        self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> None:
        """Wrap `target` (or add `adapter_name` to it if it is already wrapped)."""
        raise NotImplementedError

    def _mark_extra_trainable(self, config: Any) -> None:
        """Hook: make method-specific non-adapter tensors trainable (e.g. LoRA's `bias` option)."""

    def _check_new_adapter_config(self, config: Any) -> None:
        """Hook: refuse configs that cannot coexist with the adapters already present."""

    def extra_adapter_state(self, adapter_name: str) -> dict[str, "torch.Tensor"]:
        """Hook: checkpoint keys -> live tensors saved besides the adapter layers (e.g. biases)."""
        return {}

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        """Hook: regexes of keys that peft writes but that carry nothing this model needs."""
        return ()

    def state_for_save(self, adapter_name: str, state: dict[str, "torch.Tensor"], prefix: str) -> dict[str, "torch.Tensor"]:
        """Hook: the tensors to save for `adapter_name` (keys start with `prefix`); e.g. AdaLoRA prunes ranks.

        Return a new dict; the default saves `state` as it is.
        """
        return state

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # ------------------------------------------------------------------ adding adapters
    def _model_type(self) -> Optional[str]:
        config = getattr(self.model, "config", None)
        return getattr(config, "model_type", None) if config is not None else None

    def _prepare_adapter_config(self, config: Any) -> Any:
        """Return a copy of `config` with `target_modules` resolved (defaults, "all-linear")."""
        target_modules = config.target_modules
        if target_modules is None:
            model_type = self._model_type()
            if model_type not in self.default_target_modules:
                raise ConfigError(
                    f"target_modules is not set and peftkit has no default for model type {model_type!r}; "
                    "pass target_modules=[...] (module names), a regex, or 'all-linear'."
                )
            target_modules = self.default_target_modules[model_type]
        elif isinstance(target_modules, str) and target_modules.lower() == "all-linear":
            target_modules = self._all_linear_names(config)
        return dataclasses.replace(config, target_modules=target_modules)

    def _all_linear_names(self, config: Any) -> set[str]:
        """Every Linear / GPT-2 Conv1D except the output head and modules_to_save."""
        from transformers.pytorch_utils import Conv1D

        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        names = set()
        for name, module in self.model.named_modules():
            if not isinstance(module, (nn.Linear, Conv1D)) or module is output:
                continue
            if name.rpartition(".")[2] == "lm_head" or key_matches(name, config.modules_to_save):
                continue
            names.add(name)
        return names

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        """Inject a new adapter; on any failure the model is left exactly as before."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"An adapter named {adapter_name!r} exists already; pick another name.")
        config = self._prepare_adapter_config(config)
        self._check_new_adapter_config(config)
        self.peft_config[adapter_name] = config
        try:
            self._inject(adapter_name, config)
        except BaseException:
            self._remove_adapter_from_layers(adapter_name)
            del self.peft_config[adapter_name]
            raise
        # Layers that only the new adapter wraps must follow the model's active adapter(s).
        active = [name for name in self.active_adapters if name in self.peft_config] or [adapter_name]
        for _, module in self.adapter_modules():
            module.set_adapter(active)
        self._mark_only_adapters_as_trainable()

    def _inject(self, adapter_name: str, config: Any) -> None:
        wrapped = [name for name, module in self.model.named_modules() if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))]
        keys = [
            name
            for name, _ in self.model.named_modules()
            if name and not any(name.startswith(prefix + ".") for prefix in wrapped)
        ]
        modules_to_save = getattr(config, "modules_to_save", None)
        matched = []
        for key in keys:
            if key_matches(key, modules_to_save):
                self._wrap_module_to_save(key, adapter_name)
            elif is_targeted(config, key):
                parent, target, target_name = get_submodules(self.model, key)
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
                matched.append(key)
        if not matched:
            raise TargetModulesError(describe_unmatched(config.target_modules, self.model))
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(matched))

    def _wrap_module_to_save(self, key: str, adapter_name: str) -> None:
        parent, target, target_name = get_submodules(self.model, key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
        else:
            replace_module(parent, target_name, ModulesToSaveWrapper(target, adapter_name))

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        """Delete `adapter_name` everywhere; wrappers left with no adapter are unwrapped."""
        for key, module in list(self.adapter_modules()):
            if isinstance(module, BaseTunerLayer) and adapter_name in module.merged_adapters:
                module.unmerge()
            module.delete_adapter(adapter_name)
            empty = not (module.adapter_names() if isinstance(module, BaseTunerLayer) else len(module.modules_to_save))
            if empty:
                parent, _, name = get_submodules(self.model, key)
                original = module.base_layer if isinstance(module, BaseTunerLayer) else module.original_module
                replace_module(parent, name, original)

    # ------------------------------------------------------------------ iteration
    def adapter_modules(self) -> Iterator[tuple[str, AdapterLike]]:
        """(name, module) of every tuner layer and modules-to-save wrapper, outermost only.

        The walk does not descend into the wrappers it yields: with many adapters their ModuleDicts
        hold most of the model's modules (32 LoRA adapters: ~100 per wrapped layer), and a
        mixed-batch call walks the model twice per forward.
        """
        stack: list[tuple[str, nn.Module]] = [("", self.model)]
        seen: set[int] = set()
        while stack:
            name, module = stack.pop()
            if id(module) in seen:  # a module registered twice is visited once, as named_modules does
                continue
            seen.add(id(module))
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                yield name, module
                continue
            children = [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
            stack.extend(reversed(children))  # pre-order, in registration order, as named_modules

    def tuner_layers(self) -> Iterator[tuple[str, BaseTunerLayer]]:
        for name, module in self.adapter_modules():
            if isinstance(module, BaseTunerLayer):
                yield name, module

    # ------------------------------------------------------------------ trainability
    def _mark_only_adapters_as_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapters (unless in inference mode)."""
        self.model.requires_grad_(False)
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is None or config.inference_mode:
                continue
            for _, module in self.adapter_modules():
                if isinstance(module, BaseTunerLayer):
                    for param in module.adapter_params([name]):
                        param.requires_grad_(True)
                elif name in module.modules_to_save and module.active_adapter == name:
                    module.modules_to_save[name].requires_grad_(True)
            self._mark_extra_trainable(config)

    # ------------------------------------------------------------------ switching
    def _check_adapter_exists(self, adapter_names: list[str]) -> None:
        missing = [name for name in adapter_names if name not in self.peft_config]
        if missing:
            raise AdapterNameError(
                f"Unknown adapter(s) {missing}; this model has {sorted(self.peft_config)}. "
                "Load or add the adapter first."
            )

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make `adapter_name` (one name or several) the active adapter(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_adapter_exists(names)
        for _, module in self.adapter_modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                warnings.warn("Adapters were merged; unmerging them before switching.", stacklevel=2)
                module.unmerge()
            module.set_adapter(names)
        self.active_adapter = names[0] if len(names) == 1 else names
        self._mark_only_adapters_as_trainable()

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, module in self.adapter_modules():
            module.enable_adapters(enabled)
        if enabled:
            self._mark_only_adapters_as_trainable()

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    @contextmanager
    def _adapters_disabled(self) -> Iterator[None]:
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active."""
        self._check_adapter_exists([adapter_name])
        del self.peft_config[adapter_name]
        self._remove_adapter_from_layers(adapter_name)
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
            warnings.warn(f"Deleted the active adapter; {remaining[0]!r} is active now.", stacklevel=2)
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapter = []

    # ------------------------------------------------------------------ merging
    def _check_merge_allowed(self) -> None:
        """Hook: methods whose update is not a weight delta refuse merging here."""

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the (active or named) adapters into the base weights, keeping them unmergeable."""
        self._check_merge_allowed()
        if adapter_names is not None:
            self._check_adapter_exists(list(adapter_names))
        for _, layer in self.tuner_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`; warns (and does nothing) when nothing is merged."""
        layers = [layer for _, layer in self.tuner_layers() if layer.merged]
        if not layers:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model."""
        self._check_merge_allowed()
        if adapter_names is not None:
            self._check_adapter_exists(list(adapter_names))
        return self._unload(merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        return self._unload(merge=False)

    def _unload(
        self, merge: bool, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        modules = list(self.adapter_modules())
        for key, module in tqdm(modules, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "")):
            parent, _, name = get_submodules(self.model, key)
            if isinstance(module, ModulesToSaveWrapper):
                # As peft: the trained copy of the active adapter replaces the original, merged or not.
                replace_module(parent, name, module.resolve(module.active_adapter))
                continue
            if merge:
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            elif module.merged:
                module.unmerge()
            replace_module(parent, name, module.base_layer)
        return self.model

    def _require_unmerged(self, action: str) -> None:
        if any(layer.merged for _, layer in self.tuner_layers()):
            raise AdapterStateError(f"Cannot {action} while adapters are merged; call unmerge_adapter() first.")
