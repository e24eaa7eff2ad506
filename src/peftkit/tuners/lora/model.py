"""`LoraModel`: the LoRA tuner -- picks per-module rank/alpha and wraps targets in LoRA layers."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...errors import AdapterStateError, ConfigError, TargetModulesError
from .._core.call_state import call_scope
from .._core.layer import BaseTunerLayer
from .._core.matching import pattern_value
from .._core.module_tree import get_submodules, replace_module
from .._core.size_limits import check_parameter_adapter_size
from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from .config import LoraConfig
from .conversion import convert_mutated_init_to_lora
from .constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .init import init_options, is_valid_base_weight_init
from .layer import SUPPORTED_LAYERS, LoraLayer, dispatch_conv, dispatch_embedding, dispatch_linear
from .mha import dispatch_mha
from .alora import calculate_offsets
from .extra_variants import check_combination, variant_request
from .kasa import check_kasa_mixing, kasa_regularization
from .mixed_batch import check_names
from .param_wrapper import ParamWrapper, existing_wrapper, parameter_targets
from .tied import apply_weight_tying, plan_weight_tying, tied_output_names
from .weighted import add_weighted_adapter


#: peft's public name for LoRA's default targets per architecture (the same table).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = LORA_TARGET_MODULES_BY_MODEL_TYPE


class LoraModel(BiasOptions, BaseTuner):
    """Creates LoRA adapters on a model: `LoraModel(model, LoraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "lora_"
    default_target_modules = LORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = LoraLayer
    dispatchers = (dispatch_embedding, dispatch_conv, dispatch_mha, dispatch_linear)
    display_name = "LoRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: LoraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        variant = variant_request(config, key)  # VeLoRA / BD-LoRA / MonteCLoRA / KaSA (`extra_variants.py`)
        return ({"variant": variant} if variant is not None else {}) | {
            "r": pattern_value(config.rank_pattern or {}, key, config.r),
            "lora_alpha": pattern_value(config.alpha_pattern or {}, key, config.lora_alpha),
            "lora_dropout": config.lora_dropout,
            "init_lora_weights": config.init_lora_weights,
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "lora_bias": config.lora_bias,
            "use_alora": bool(config.alora_invocation_tokens),
            "init_config": init_options(config),
        }

    def _prepare_adapter_config(self, config: LoraConfig) -> LoraConfig:
        """As every method; besides, `target_parameters` alone is a complete target (peft's rule)."""
        if config.target_modules is None and config.target_parameters and self._model_type() not in self.default_target_modules:
            return dataclasses.replace(config)
        return super()._prepare_adapter_config(config)

    def _create_and_replace(
        self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> None:
        """As every method, except that a module of a type registered with `LoraConfig._register_custom_module`
        is wrapped by the registered class, `cls(target, adapter_name, **layer_kwargs)` (peft's experimental API)."""
        custom = getattr(config, "_custom_modules", None) or {}
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = next((cls for kind, cls in custom.items() if isinstance(base, kind)), None)
        if layer_cls is None or isinstance(target, layer_cls):
            return super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key)
        warnings.warn(f"Unsupported layer type '{type(base)}' encountered, proceed at your own risk.", UserWarning,
                      stacklevel=5)
        kwargs = {**self.layer_kwargs(config, adapter_name, current_key, target),
                  **self.new_layer_kwargs(config, adapter_name, current_key, target)}
        replace_module(parent, target_name, layer_cls(target, adapter_name, **kwargs))

    def _inject(self, adapter_name: str, config: LoraConfig, targets: Any = None) -> None:
        """Wrap the modules `target_modules` selects, the parameters `target_parameters` names, and tie
        output layers to the embedding (`ensure_weight_tying`, see `tied.py`)."""
        plan = plan_weight_tying(self.model, config) if hasattr(self.model, "get_input_embeddings") else None
        if plan is not None:
            config = plan.config
            if targets is not None:  # a state dict names the tied layers too: they are tied, not wrapped
                targets = set(targets) - set(plan.tied_targets)
        self._inject_targets(adapter_name, config, targets)
        if plan is not None:
            apply_weight_tying(self, adapter_name, plan)

    def _inject_targets(self, adapter_name: str, config: LoraConfig, targets: Any = None) -> None:
        if not config.target_parameters:
            return super()._inject(adapter_name, config, targets)
        if targets is not None:
            raise ConfigError(
                "Trying to inject a PEFT adapter from a state_dict but the PEFT config uses `target_parameters`. This "
                "is not supported -- when using `target_parameters`, please inject the adapter without the state_dict."
            )
        found = parameter_targets(self.model, config.target_parameters, self.prefix)
        if config.target_modules:
            try:
                super()._inject(adapter_name, config)
            except TargetModulesError:
                if not found:
                    raise
                warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning, stacklevel=4)
        elif not found:
            raise TargetModulesError(
                "No `target_modules` passed but also no `target_parameters` found. Please check the values for these "
                f"arguments: no parameter of {type(self.model).__name__} is named by {config.target_parameters}."
            )
        if not found:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.", RuntimeWarning, stacklevel=4)
        for path, param_name in found:  # every size checked before the first parameter is wrapped
            key = f"{path}.{param_name}"
            target = get_submodules(self.model, path)[1]
            size = self.layer_kwargs(config, adapter_name, key, target).get("r")
            check_parameter_adapter_size(config, size, target, param_name, key)
        for path, param_name in found:
            self._wrap_parameter(adapter_name, config, path, param_name)
        self.targeted_parameter_names = sorted(set(getattr(self, "targeted_parameter_names", [])) | {f"{p}.{n}" for p, n in found})

    def _wrap_parameter(self, adapter_name: str, config: LoraConfig, path: str, param_name: str) -> None:
        """Add `adapter_name` to the `ParamWrapper` of `path.param_name`, creating (nesting) it if needed."""
        parent, target, name = get_submodules(self.model, path)
        if isinstance(target, BaseTunerLayer) and not isinstance(target, ParamWrapper):
            raise ConfigError(
                f"Trying to wrap an `nn.Parameter` of layer '{path}' of type {type(target).__name__}, which is not a "
                "valid target. Make sure that this layer is not also targeted with `target_modules`. For some models, "
                "peftkit does this automatically; try setting `target_modules=[]` to prevent it."
            )
        kwargs = self.layer_kwargs(config, adapter_name, f"{path}.{param_name}", target)
        wrapper = existing_wrapper(target, param_name)
        if wrapper is not None:
            wrapper.update_layer(adapter_name, **kwargs)
        else:
            replace_module(parent, name, ParamWrapper(target, adapter_name, parameter_name=param_name, **kwargs))

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        check_combination(config)
        check_kasa_mixing(config, self.peft_config)
        targets = set(config.target_parameters or ())
        for name, other in self.peft_config.items():
            if targets and other.target_parameters and set(other.target_parameters) != targets:
                raise ConfigError(
                    "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                    f"parameters, but got {sorted(targets)} for the new adapter and {sorted(other.target_parameters)} "
                    f"for adapter '{name}'."
                )
        configs = [config, *self.peft_config.values()]
        if len(configs) > 1 and any(is_valid_base_weight_init(cfg.init_lora_weights) for cfg in configs):
            warnings.warn(
                "PiSSA/OLoRA/LoRA-GA/CorDA adapters change the base weights, so they should not be combined with other adapters. "
                "Convert them to plain LoRA with save_pretrained(..., path_initial_model_for_weight_conversion=...).",
                stacklevel=4,
            )
        super()._check_new_adapter_config(config)

    def prepare_save(
        self, adapter_name: str, state: dict[str, torch.Tensor], config_fields: dict[str, Any], **save_options: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """With `path_initial_model_for_weight_conversion`, save PiSSA/OLoRA/LoRA-GA as plain LoRA (conversion.py)."""
        initial_dir = save_options.get("path_initial_model_for_weight_conversion")
        if initial_dir is None:
            return super().prepare_save(adapter_name, state, config_fields, **save_options)
        return convert_mutated_init_to_lora(
            self.peft_config[adapter_name], state, config_fields, initial_dir, save_options["read_weights"]
        )

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        tolerated = super().tolerated_checkpoint_keys(adapter_name)
        # peft writes a tied output layer's (views of the embedding's) factors, and on reloading a config
        # whose embedding is not named `embed_tokens` it does not tie again and ignores them; so do we.
        for name in tied_output_names(self.model):
            tolerated += (rf"(.*\.)?{re.escape(name)}\.lora_[AB]\.weight$",)
        return tolerated

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """For one forward / generate call, row i of the batch uses adapter `adapter_names[i]`.

        "__base__" means no adapter. Layers compute all rows in one batched operation (see
        `mixed_batch.py`). Merged adapters and DoRA cannot be mixed this way.
        """
        check_names(adapter_names, list(self.peft_config))
        if any(layer.merged for _, layer in self.tuner_layers()):
            raise AdapterStateError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        if any(self.peft_config[n].alora_invocation_tokens for n in set(adapter_names) & set(self.peft_config)):
            raise ConfigError(
                "Mixed-adapter batches do not support aLoRA adapters (alora_invocation_tokens) yet; run them one "
                "adapter at a time."
            )
        if any(getattr(self.peft_config[n], "use_dora", False) for n in set(adapter_names) & set(self.peft_config)):
            raise ConfigError(
                "Cannot pass `adapter_names` when DoRA is enabled. Mixed-adapter batches do not support DoRA "
                "adapters; run them one adapter at a time."
            )
        # The names travel with the call (per thread, `_core/call_state.py`), not on the shared layers:
        # concurrent calls from other threads keep their own. One immutable copy (the layers' caches key on it).
        with call_scope(adapter_names=tuple(adapter_names)):
            yield

    @contextmanager
    def per_call_context(self, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
        """For one forward / generate call: aLoRA's per-row offsets (`alora.py`), taken from
        `kwargs["alora_offsets"]` or found in the call's `input_ids`; none when no aLoRA is active.
        They are per-call state (`_core/call_state.py`): concurrent calls each see their own."""
        offsets = kwargs.pop("alora_offsets", None)
        active = [name for name in self.active_adapters if name in self.peft_config]
        if not any(self.peft_config[name].alora_invocation_tokens for name in active):
            with call_scope(offsets=None):  # none for this call, whatever an enclosing call of another model set
                yield
            return
        if offsets is None:
            input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if input_ids is None:
                warnings.warn("Cannot calculate aLoRA offsets without input_ids. Disabling aLoRA for this call.", stacklevel=4)
            else:
                ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
                offsets = calculate_offsets(self.peft_config, active[0], ids)
        if offsets is not None:
            offsets = tuple(None if offset is None else int(offset) for offset in offsets)
        with call_scope(offsets=offsets):  # travels with the call (`_core/call_state.py`), as the row names
            yield

    def _variant_layers(self, adapter_names: Any, container: str) -> Iterator[tuple[LoraLayer, str]]:
        """(layer, adapter) for every LoRA layer holding `container[adapter]`; default: the active adapters."""
        names = self.active_adapters if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for module in self.model.modules():
            held = getattr(module, container, None) if isinstance(module, LoraLayer) else None
            if held is not None:
                yield from ((module, name) for name in names if name in held)

    def _get_monteclora_loss(self, adapter_names: Any = None) -> Any:
        """MonteCLoRA's variational loss (`monteclora.py`), averaged over the samplers of `adapter_names`
        (default: the active adapters); 0.0 when there are none. Add it to the task loss while training."""
        total, count = 0.0, 0
        for layer, name in self._variant_layers(adapter_names, "lora_monteclora_sampler"):
            kl_term, entropy = layer.lora_monteclora_sampler[name].get_variational_loss()
            total, count = total + kl_term + entropy, count + 1
        return total / count if count else 0.0

    def _get_kasa_loss(self, adapter_names: Any = None) -> Any:
        """KaSA's regularisers (`kasa.py`) summed over the KaSA layers of `adapter_names` (default: the active
        adapters), with each adapter's `kasa_config.beta / gamma`; 0.0 when there are none."""
        total = 0.0
        for layer, name in self._variant_layers(adapter_names, "lora_diag"):
            settings = self.peft_config[name].kasa_config
            total = total + kasa_regularization(layer, name, settings.beta, settings.gamma)
        return total

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """Add `adapter_name`, a weighted combination of `adapters` (see `weighted.add_weighted_adapter`).

        kwargs: combination_type ("svd" default, "linear", "cat", "ties", "dare_linear", "dare_ties",
        "magnitude_prune" and their "_svd" forms), svd_rank, svd_clamp, svd_full_matrices, svd_driver,
        density, majority_sign_method ("total" | "frequency").
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

