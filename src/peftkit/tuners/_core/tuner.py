"""`BaseTuner`: injects a method's layers into any `nn.Module` by module name, and manages them.

A method subclasses it and declares (see docs/ARCHITECTURE.md):

    prefix                  attribute prefix of its adapter tensors, e.g. "lora_"
    default_target_modules  per `config.model_type`
    layer_cls               its layer base class (targets already wrapped get `update_layer`)
    layer_kwargs(config, adapter_name, key, target) -> update_layer's arguments at `key`
    dispatchers             ordered tuple: the first that returns a layer wraps the target

Everything else -- match -> update-or-wrap -> replace, several named adapters, switching,
disabling, merging, unloading, and rolling back a failed injection -- lives here, once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import AdapterNameError, AdapterStateError, ConfigError, TargetModulesError
from ...utils.constants import PEFT_MODEL_PREFIX
from ...utils.adapter_names import adapter_name_list, validate_adapter_name
from .base_journal import restoring_base_weights_on_failure
from .base_layers import record_layout
from .layer import BaseTunerLayer
from .matching import describe_unmatched, is_targeted, key_matches, matching_pattern
from .merging import merge_layers, warn_if_merging_tied_targets
from .module_tree import get_submodules, replace_module, tied_module_names
from .modules_to_save import AuxiliaryWrapper, ModulesToSaveWrapper
from .size_limits import check_targets_adapter_size
from .trainable_tokens import TrainableTokensWrapper, token_targets

AdapterLike = Union[BaseTunerLayer, AuxiliaryWrapper]

#: Builds a method's layer around `target` if it understands `target`'s (innermost) base layer,
#: else returns None: `dispatch(target, adapter_name, **layer_kwargs) -> Optional[nn.Module]`.
Dispatcher = Callable[..., Optional[nn.Module]]


class BaseTuner(nn.Module):
    """Holds the wrapped model (`self.model`) and the configs of its adapters (`self.peft_config`)."""

    #: Attribute prefix of the method's adapter tensors (e.g. "lora_").
    prefix: ClassVar[str] = ""
    default_target_modules: ClassVar[dict[str, Any]] = {}
    #: The method's layers: a target that is one already gets `update_layer(adapter_name, **layer_kwargs)`.
    layer_cls: ClassVar[type] = BaseTunerLayer
    #: Ordered; the first that returns a layer wraps the target.
    dispatchers: ClassVar[tuple[Dispatcher, ...]] = ()
    #: For error messages: the method's name and the layer types its dispatchers accept.
    display_name: ClassVar[str] = ""
    supported_layers: ClassVar[str] = ""
    #: True when adapter tensors live on the tuner itself (VeRA's projections, VB-LoRA's bank):
    #: `inject_adapter_in_model`, which keeps no tuner, refuses such methods (as peft does).
    uses_shared_state: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        peft_config: Any,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[Mapping[str, Any]] = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.targeted_module_names: list[str] = []
        self.active_adapter: Union[str, list[str]] = adapter_name
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.add_adapter(name, config, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
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

    # ------------------------------------------------------------------ the method contract
    def layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """The arguments of `layer_cls.update_layer` for the module at `key`: where config becomes layer."""
        raise NotImplementedError

    def new_layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """Hook: extra constructor arguments of a new layer (besides `layer_kwargs`)."""
        return {}

    def _create_and_replace(
        self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> None:
        """Add `adapter_name` to `target` if this method wraps it already, else wrap it.

        The first of `dispatchers` that returns a layer wins; none -> a TargetModulesError that
        names the module and what the method supports, raised before anything is changed.
        """
        kwargs = self.layer_kwargs(config, adapter_name, current_key, target)
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, **kwargs)
            return
        kwargs.update(self.new_layer_kwargs(config, adapter_name, current_key, target))
        built = (dispatch(target, adapter_name, **kwargs) for dispatch in self.dispatchers)
        new_module = next((layer for layer in built if layer is not None), None)
        if new_module is None:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            raise TargetModulesError(
                f"Target module {current_key!r} is a {type(base).__name__}, which {self.display_name} cannot wrap. "
                f"Supported: {self.supported_layers}. Narrow target_modules (or add {target_name!r} to exclude_modules)."
            )
        record_layout(config, new_module, current_key)
        replace_module(parent, target_name, new_module)

    def _mark_extra_trainable(self, config: Any) -> None:
        """Hook: make method-specific non-adapter tensors trainable (e.g. LoRA's `bias` option)."""

    def _check_new_adapter_config(self, config: Any) -> None:
        """Hook: refuse configs that cannot coexist with the adapters already present."""

    def extra_adapter_state(self, adapter_name: str) -> dict[str, "torch.Tensor"]:
        """Hook: checkpoint keys -> live tensors saved besides the adapter layers (e.g. biases)."""
        return {}

    def accepted_checkpoint_tensors(self, adapter_name: str) -> dict[str, "torch.Tensor"]:
        """Checkpoint keys -> live tensors loaded when a checkpoint has them, never required.

        The model's biases (outside modules-to-save copies), under their module paths: peft loads
        checkpoints with `load_state_dict(strict=False)`, so biases trained with `bias="all"` /
        `"lora_only"` load even into a model whose config does not train them.
        """
        wrappers = [name for name, module in self.adapter_modules() if isinstance(module, ModulesToSaveWrapper)]
        return {
            name.replace("_fsdp_wrapped_module.", ""): param
            for name, param in self.model.named_parameters()
            if name.rpartition(".")[2] == "bias" and not any(name.startswith(w + ".") for w in wrappers)
        }

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        """Hook: regexes of keys that peft writes but that carry nothing this model needs."""
        return ()

    def state_for_save(self, adapter_name: str, state: dict[str, "torch.Tensor"], prefix: str) -> dict[str, "torch.Tensor"]:
        """Hook: the tensors to save for `adapter_name` (keys start with `prefix`); e.g. AdaLoRA prunes ranks.

        Return a new dict; the default saves `state` as it is.
        """
        return state

    def checkpoint_for_load(self, adapter_name: str, state: dict[str, "torch.Tensor"], prefix: str) -> dict[str, "torch.Tensor"]:
        """Hook: checkpoint tensors (keys start with `prefix`) as this model's tensors expect them; the
        inverse of `state_for_save` (e.g. VB-LoRA's top-k logits). Return a new dict; the default loads
        `state` as it is.
        """
        return state

    def prepare_save(
        self, adapter_name: str, state: dict[str, "torch.Tensor"], config_fields: dict[str, Any], **save_options: Any
    ) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
        """Hook: the (tensors, adapter_config.json fields) `save_pretrained` writes for `adapter_name`.

        `save_options` are save_pretrained's conversion options (`path_initial_model_for_weight_conversion`)
        and `read_weights(folder)`, a reader of saved adapters. The default writes both unchanged and
        refuses the conversion, which only LoRA's PiSSA/OLoRA inits define.
        """
        if save_options.get("path_initial_model_for_weight_conversion") is not None:
            raise ConfigError(
                "path_initial_model_for_weight_conversion is only supported for LoRA adapters, "
                f"not {self.peft_config[adapter_name].peft_type}."
            )
        return state, config_fields

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Hook: peft's `autocast_adapter_dtype`. Layers create adapters in fp32 over fp16/bf16 bases
        (True); with False, `adapter_name`'s tensors take their base layer's dtype instead."""
        if not autocast_adapter_dtype:
            for _, layer in self.tuner_layers():
                layer._move_adapter_to_base(adapter_name, keep_fp32=False)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # ------------------------------------------------------------------ adding adapters
    def _model_type(self) -> Optional[str]:
        config = getattr(self.model, "config", None)
        model_type = getattr(config, "model_type", None) if config is not None else None
        if not isinstance(model_type, str) and hasattr(config, "to_dict"):  # peft reads config.to_dict()
            model_type = config.to_dict().get("model_type")
        return model_type if isinstance(model_type, str) else None

    def _prepare_adapter_config(self, config: Any) -> Any:
        """Return a copy of `config` with `target_modules` resolved (defaults, "all-linear")."""
        target_modules = config.target_modules
        if target_modules is None:
            model_type = self._model_type()
            if model_type not in self.default_target_modules:
                raise ConfigError(
                    "Please specify `target_modules` in `peft_config`: "
                    f"target_modules is not set and peftkit has no default for model type {model_type!r}; "
                    "pass target_modules=[...] (module names), a regex, or 'all-linear'."
                )
            target_modules = self.default_target_modules[model_type]
        elif isinstance(target_modules, str) and target_modules.lower() == "all-linear":
            target_modules = self._all_linear_names(config)
        return dataclasses.replace(config, target_modules=target_modules)

    def _all_linear_names(self, config: Any) -> set[str]:
        """Every Linear / GPT-2 Conv1D except the output head and modules_to_save.

        A layer an earlier adapter wrapped counts by its base layer, so a second "all-linear"
        adapter targets the same layers; nothing inside a wrapped layer counts (its `base_layer`,
        the adapters' own Linear modules), nor inside a modules_to_save / trainable-tokens wrapper.
        """
        from transformers.pytorch_utils import Conv1D

        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        names, inside = set(), None  # named_modules() is pre-order: a wrapper's insides follow it
        for name, module in self.model.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            inside = name + "." if isinstance(module, (BaseTunerLayer, AuxiliaryWrapper)) else None
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, (nn.Linear, Conv1D)) or base is output:
                continue
            if name.rpartition(".")[2] == "lm_head" or key_matches(name, config.modules_to_save):
                continue
            names.add(name)
        return names

    def add_adapter(
        self, adapter_name: str, config: Any, low_cpu_mem_usage: bool = False, state_dict: Optional[Mapping[str, Any]] = None
    ) -> None:
        """Inject a new adapter; on any failure the model is left exactly as before.

        `low_cpu_mem_usage`: the new adapter's parameters are created on the meta device (loading
        weights materialises them). `state_dict`: wrap the modules its keys name instead of those
        `target_modules` selects (peft's rule; the values are not used).
        """
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"Adapter with name '{adapter_name}' already exists; pick another name.")
        config = self._prepare_adapter_config(config)
        self._check_new_adapter_config(config)
        self.peft_config[adapter_name] = config
        try:
            with restoring_base_weights_on_failure():  # inits such as PiSSA/OLoRA rewrite base weights
                with _parameters_on_meta(low_cpu_mem_usage):
                    if state_dict is None:
                        self._inject(adapter_name, config)
                    else:
                        self._inject(adapter_name, config, _modules_named_in(state_dict, self.prefix, self.model))
                if low_cpu_mem_usage:
                    _refuse_unsaved_meta(self, adapter_name)
        except BaseException:
            self._remove_adapter_from_layers(adapter_name)
            del self.peft_config[adapter_name]
            raise
        # Layers that only the new adapter wraps must follow the model's active adapter(s).
        active = [name for name in self.active_adapters if name in self.peft_config] or [adapter_name]
        for _, module in self.adapter_modules():
            module.set_adapter(active)
        self._mark_only_adapters_as_trainable()

    def _inject(self, adapter_name: str, config: Any, targets: Optional[set[str]] = None) -> None:
        """Wrap the modules `config` selects, or exactly the module names `targets` when given."""
        wrapped = [name for name, module in self.model.named_modules() if isinstance(module, (BaseTunerLayer, AuxiliaryWrapper))]
        keys = [
            name
            for name, _ in self.model.named_modules()
            if name and not any(name.startswith(prefix + ".") for prefix in wrapped)
        ]
        modules_to_save = getattr(config, "modules_to_save", None)
        # Select (bad regexes refused) and size-check every target before the model is changed.
        selected = {
            key
            for key in keys
            if not key_matches(key, modules_to_save) and (is_targeted(config, key) if targets is None else key in targets)
        }
        check_targets_adapter_size(self, config, adapter_name, [key for key in keys if key in selected])
        matched = []
        for key in keys:
            if key_matches(key, modules_to_save):
                self._wrap_module_to_save(key, adapter_name)
            elif key in selected:
                parent, target, target_name = get_submodules(self.model, key)
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
                matched.append(key)
        if not matched:
            raise TargetModulesError(describe_unmatched(config.target_modules, self.model, config))
        if getattr(config, "trainable_token_indices", None) is not None:
            self._wrap_trainable_tokens(adapter_name, config)
        if targets is not None:
            by_config = [key for key in keys if is_targeted(config, key) and not key_matches(key, modules_to_save)]
            _warn_if_targets_differ(by_config, matched)
        _warn_unmatched_patterns(config, matched)
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(matched))

    def _wrap_module_to_save(self, key: str, adapter_name: str) -> None:
        parent, target, target_name = get_submodules(self.model, key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
        else:
            replace_module(parent, target_name, ModulesToSaveWrapper(target, adapter_name))

    def _wrap_trainable_tokens(self, adapter_name: str, config: Any) -> None:
        """`trainable_token_indices`: trainable rows of the named embeddings (and of output layers tied to them)."""
        targets = token_targets(self.model, config.trainable_token_indices)
        for name in targets:
            if name in (config.modules_to_save or ()):
                raise ConfigError(
                    "The embedding layer is already marked to be trained fully, either specify "
                    f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but not both.'
                )
        wrapped = [n for n, m in self.model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryWrapper))]
        keys = [n for n, _ in self.model.named_modules() if n and not any(n.startswith(w + ".") for w in wrapped)]
        for name, indices in targets.items():
            found = [key for key in keys if key_matches(key, [name])]
            if not found:
                raise TargetModulesError(
                    f"Target modules {[name]} not found in the base model. Please check the target modules and try "
                    "again: trainable_token_indices names a module the model does not have."
                )
            for key in found:
                parent, target, target_name = get_submodules(self.model, key)
                if isinstance(target, TrainableTokensWrapper):
                    target.update(adapter_name, indices)
                    continue
                tied = tied_module_names(self.model, target)
                wrapper = TrainableTokensWrapper(target, adapter_name, indices)
                replace_module(parent, target_name, wrapper)
                for tied_key in tied:  # the output layer shares the weight: it shares the rows too
                    tied_parent, tied_target, tied_name = get_submodules(self.model, tied_key)
                    if not isinstance(tied_target, TrainableTokensWrapper):
                        layer = wrapper.token_adapter
                        replace_module(tied_parent, tied_name, TrainableTokensWrapper(tied_target, adapter_name, indices, layer))

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        """Delete `adapter_name` everywhere; wrappers left with no adapter are unwrapped."""
        for key, module in list(self.adapter_modules())[::-1]:  # inner layers first
            if isinstance(module, BaseTunerLayer) and adapter_name in module.merged_adapters:
                module.unmerge()
            module.delete_adapter(adapter_name)
            empty = not (module.adapter_names() if isinstance(module, BaseTunerLayer) else module.held_adapters())
            if empty:
                parent, _, name = get_submodules(self.model, key)
                original = module.unwrapped() if isinstance(module, BaseTunerLayer) else module.original_module
                replace_module(parent, name, original)

    # ------------------------------------------------------------------ iteration
    def adapter_modules(self) -> Iterator[tuple[str, AdapterLike]]:
        """(name, module) of every tuner layer and auxiliary wrapper of the model (`adapter_modules_of`)."""
        return adapter_modules_of(self.model)

    def tuner_layers(self) -> Iterator[tuple[str, BaseTunerLayer]]:
        for name, module in self.adapter_modules():
            if isinstance(module, BaseTunerLayer):
                yield name, module

    # ------------------------------------------------------------------ trainability
    def _mark_only_adapters_as_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapters (unless in inference mode)."""
        self.model.requires_grad_(False)
        if getattr(self, "_active_inference_mode", False):
            return  # set_adapter(..., inference_mode=True)
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is None or config.inference_mode:
                continue
            for _, module in self.adapter_modules():
                if isinstance(module, BaseTunerLayer):
                    for param in module.trainable_adapter_params([name]):
                        param.requires_grad_(True)
                elif name in module.held_adapters() and module.active_adapter == name:
                    for tensor in module.adapter_tensors(name):
                        tensor.requires_grad_(True)
            self._mark_extra_trainable(config)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Gradients of the named adapters' trainable tensors on or off (frozen factors stay frozen)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_adapter_exists(names)
        set_adapters_requires_grad(self.model, names, requires_grad)

    # ------------------------------------------------------------------ switching
    def _check_adapter_exists(self, adapter_names: list[str], missing_phrase: str = "does not exist") -> None:
        """Refuse unknown names; the message starts as peft's ("Adapter X does not exist", "Adapter X not found.")."""
        missing = [name for name in adapter_names if name not in self.peft_config]
        if missing:
            raise AdapterNameError(
                f"Adapter {', '.join(map(str, missing))} {missing_phrase}. Unknown adapter(s) {missing}; "
                f"this model has {sorted(self.peft_config)}. Load or add the adapter first."
            )

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make `adapter_name` (one name or several) the active adapter(s).

        They train unless `inference_mode=True` (peft's argument) or their config has `inference_mode`
        set (e.g. loaded with `is_trainable=False`); `inference_mode=True` keeps them frozen until the
        next `set_adapter`.
        """
        names = adapter_name_list(adapter_name, self.peft_config)  # None, 3, [None]: AdapterNameError
        self._check_adapter_exists(names, "not found")
        for _, module in self.adapter_modules():  # refuse before changing anything
            if isinstance(module, AuxiliaryWrapper):
                module.check_set_adapter(names)
        warned = False
        for _, module in self.adapter_modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                if not warned:
                    warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
                    warned = True
                module.unmerge()
            module.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names[0] if len(names) == 1 else names
        self._active_inference_mode = bool(inference_mode)
        self._mark_only_adapters_as_trainable()

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, module in self.adapter_modules():
            module.enable_adapters(enabled)
        if enabled:
            self._mark_only_adapters_as_trainable()

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off (the base model's output); warns, as peft, when biases are trained."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption.",
                    stacklevel=2,
                )
        self._set_adapter_layers(False)

    def _enabled_flags(self) -> list[bool]:
        """Per adapter layer / modules-to-save wrapper: whether its adapters are enabled."""
        return [not module.disable_adapters for _, module in self.adapter_modules()]

    @contextmanager
    def _adapters_disabled(self) -> Iterator[None]:
        """`PeftModel.disable_adapter()`: off inside; on exit each layer is enabled again unless all were
        disabled before (peft's rule). A mix of enabled and disabled layers warns and ends all enabled."""
        flags = self._enabled_flags()
        if True in flags and False in flags:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. "
                "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                "will be enabled",
                stacklevel=3,
            )
        all_disabled = bool(flags) and not any(flags)
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if not all_disabled:
                self.enable_adapter_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active.

        A merged adapter is refused (as in peft) before anything changes; adapters merged besides
        the deleted one stay merged.
        """
        self._check_adapter_exists([adapter_name], "does not exist")
        if any(adapter_name in layer.merged_adapters for _, layer in self.tuner_layers()):
            raise AdapterStateError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        self._remove_adapter_from_layers(adapter_name)
        if adapter_name not in self.active_adapters:
            return  # the active adapters (and anything merged) stay as they are
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
            warnings.warn(f"Deleted the active adapter; {remaining[0]!r} is active now.", stacklevel=2)
        if remaining:
            self.set_adapter(remaining, inference_mode=getattr(self, "_active_inference_mode", False))
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
        warn_if_merging_tied_targets(self.model, self.targeted_module_names)
        merge_layers([layer for _, layer in self.tuner_layers()], safe_merge, adapter_names)

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
        modules = list(self.adapter_modules())[::-1]  # inner layers before the layers that wrap them
        if merge:  # all layers merged, or (on failure) none and the model still wrapped
            warn_if_merging_tied_targets(self.model, self.targeted_module_names)
            layers = [module for _, module in modules if isinstance(module, BaseTunerLayer)]
            merge_layers(layers, safe_merge, adapter_names, progressbar=progressbar)
        for key, module in tqdm(modules, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "")):
            parent, _, name = get_submodules(self.model, key)
            if isinstance(module, AuxiliaryWrapper):
                replace_module(parent, name, module.unloaded(merge, safe_merge, adapter_names))
                continue
            if not merge and module.merged:
                module.unmerge()
            replace_module(parent, name, module.unwrapped())
        # As peft: no adapter is left, so neither is the configs' attribute on the returned model.
        if "peft_config" in vars(self.model):
            del self.model.peft_config
        return self.model

    def _require_unmerged(self, action: str) -> None:
        if any(layer.merged for _, layer in self.tuner_layers()):
            raise AdapterStateError(f"Cannot {action} while adapters are merged; call unmerge_adapter() first.")


def adapter_modules_of(model: nn.Module) -> Iterator[tuple[str, AdapterLike]]:
    """(name, module) of every tuner layer and auxiliary wrapper in `model`, outer before inner.

    The walk does not descend into the wrappers it yields (with many adapters their ModuleDicts
    hold most of the model's modules -- 32 LoRA adapters: ~100 per wrapped layer -- and a
    mixed-batch call walks the model twice per forward), except along `base_layer` where that is
    itself a tuner layer: layers nested on purpose (LoRA's `ParamWrapper`, one per parameter).
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:  # a module registered twice is visited once, as named_modules does
            continue
        seen.add(id(module))
        if isinstance(module, (BaseTunerLayer, AuxiliaryWrapper)):
            yield name, module
            inner = getattr(module, "base_layer", None)
            if isinstance(inner, BaseTunerLayer):  # nested layers (LoRA's ParamWrapper): each is a layer
                stack.append((f"{name}.base_layer" if name else "base_layer", inner))
            continue
        children = [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
        stack.extend(reversed(children))  # pre-order, in registration order, as named_modules


def set_adapters_requires_grad(model: nn.Module, adapter_names: list[str], requires_grad: bool) -> None:
    """Gradients of the named adapters' trainable tensors in `model` on or off (frozen factors stay frozen)."""
    for _, module in adapter_modules_of(model):
        if isinstance(module, BaseTunerLayer):
            tensors = list(module.trainable_adapter_params(adapter_names))
        else:
            tensors = [t for name in adapter_names if name in module.held_adapters() for t in module.adapter_tensors(name)]
        for tensor in tensors:
            tensor.requires_grad_(requires_grad)


# ---------------------------------------------------------------------- low_cpu_mem_usage / state_dict injection
@contextmanager
def _parameters_on_meta(enabled: bool) -> Iterator[None]:
    """accelerate's `init_empty_weights` for parameters only (as peft), when `enabled`.

    A layer whose creation computes with its new (meta) tensors fails inside; that becomes a ConfigError.
    """
    if not enabled:
        yield
        return
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            yield
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" not in str(exc):
            raise
        raise ConfigError(
            f"low_cpu_mem_usage=True: this adapter cannot be created on the meta device ({type(exc).__name__}: "
            f"{exc}). Create or load it with low_cpu_mem_usage=False."
        ) from exc


def _refuse_unsaved_meta(tuner: BaseTuner, adapter_name: str) -> None:
    """Meta tensors of the new adapter that checkpoints do not hold could never be loaded: refuse them."""
    left = []
    # Tensors the tuner itself saves (e.g. TinyLoRA's shared vectors) are in checkpoints too.
    extra = {id(tensor) for tensor in tuner.extra_adapter_state(adapter_name).values()}
    for key, layer in tuner.tuner_layers():
        saved = extra | {id(tensor) for tensor in layer.adapter_state(adapter_name, key).values()}
        left += [
            f"{key}.{name}"
            for name, param in layer.named_parameters()
            if param.is_meta and id(param) not in saved and f".{adapter_name}." in f".{name}."
        ]
    if left:
        raise ConfigError(
            f"low_cpu_mem_usage=True: adapter {adapter_name!r} has {len(left)} tensor(s) that checkpoints do not "
            f"hold, e.g. {left[0]}, so loading could not fill them on the meta device. Create or load it with "
            "low_cpu_mem_usage=False."
        )


def _modules_named_in(state_dict: Mapping[str, Any], prefix: str, model: nn.Module) -> set[str]:
    """Module paths of the keys `<module>.<prefix>...` (peft's rule; a leading `base_model.model.` is dropped too)."""
    marker = "." + prefix
    names = {
        key.removeprefix(PEFT_MODEL_PREFIX).rsplit(marker, 1)[0].removeprefix("_orig_mod.")
        for key in state_dict
        if marker in key
    }
    present = {name for name, _ in model.named_modules() if name}
    if not names & present:
        example = next(iter(state_dict), None)
        raise TargetModulesError(
            f"The state_dict names no module of {type(model).__name__} to inject into (e.g. key {example!r}); "
            f"its keys must read '<module path>.{prefix}...', as in the state dicts peft and peftkit write."
        )
    return names


def _warn_unmatched_patterns(config: Any, targeted: list[str]) -> None:
    """peft's RuntimeWarning for `rank_pattern` / `alpha_pattern` keys that name no targeted module
    (a typo there silently leaves the default rank)."""
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field, None) or {}
        unmatched = sorted(key for key in patterns if not any(matching_pattern({key: None}, name, field) for name in targeted))
        if unmatched:
            warnings.warn(
                f"The following {field} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=5,
            )


def _warn_if_targets_differ(by_config: list[str], by_state_dict: list[str]) -> None:
    """peft's warning when the state dict and `target_modules` select different modules."""
    only_config = sorted(set(by_config) - set(by_state_dict))
    only_state_dict = sorted(set(by_state_dict) - set(by_config))
    if only_config or only_state_dict:
        warnings.warn(
            "The adapter was injected into the modules the state_dict names, which differ from what the config's "
            f"target_modules selects: only in target_modules: {only_config}; only in the state_dict: {only_state_dict}. "
            "This is fine if intended.",
            RuntimeWarning,
            stacklevel=6,
        )
