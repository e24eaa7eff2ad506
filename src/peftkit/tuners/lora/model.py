"""`LoraModel`: the LoRA tuner -- picks per-module rank/alpha and wraps targets in LoRA layers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...errors import AdapterStateError, ConfigError
from .._core.matching import pattern_value
from .._core.modules_to_save import ModulesToSaveWrapper
from .._core.tuner import BaseTuner
from .config import LoraConfig
from .conversion import convert_mutated_init_to_lora
from .constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .init import is_valid_base_weight_init
from .layer import SUPPORTED_LAYERS, LoraLayer, dispatch_conv, dispatch_embedding, dispatch_linear
from .mixed_batch import check_names
from .weighted import add_weighted_adapter


class LoraModel(BaseTuner):
    """Creates LoRA adapters on a model: `LoraModel(model, LoraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "lora_"
    default_target_modules = LORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = LoraLayer
    dispatchers = (dispatch_embedding, dispatch_conv, dispatch_linear)
    display_name = "LoRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: LoraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": pattern_value(config.rank_pattern or {}, key, config.r),
            "lora_alpha": pattern_value(config.alpha_pattern or {}, key, config.lora_alpha),
            "lora_dropout": config.lora_dropout,
            "init_lora_weights": config.init_lora_weights,
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "lora_bias": config.lora_bias,
        }

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        configs = [config, *self.peft_config.values()]
        if len(configs) > 1 and any(is_valid_base_weight_init(cfg.init_lora_weights) for cfg in configs):
            warnings.warn(
                "PiSSA/OLoRA adapters change the base weights, so they should not be combined with other adapters. "
                "Convert them to plain LoRA with save_pretrained(..., path_initial_model_for_weight_conversion=...).",
                stacklevel=4,
            )
        with_bias = [name for name, cfg in self.peft_config.items() if cfg.bias != "none"]
        if with_bias and config.bias != "none":
            raise ConfigError(
                "LoRA supports only one adapter with bias != 'none' per model; "
                f"adapter {with_bias[0]!r} has one already. Use bias='none' for the new adapter."
            )

    def _bias_parameters(self, config: LoraConfig) -> dict[str, nn.Parameter]:
        """Biases that `bias="all"` / `"lora_only"` train and save, keyed by their module path."""
        if config.bias == "none":
            return {}
        if config.bias == "lora_only":
            return {
                f"{name}.base_layer.bias": layer.base_layer.bias
                for name, layer in self.tuner_layers()
                if isinstance(layer, LoraLayer) and getattr(layer.base_layer, "bias", None) is not None
            }
        wrappers = [name for name, module in self.model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
        return {
            name.replace("_fsdp_wrapped_module.", ""): param  # checkpoint keys have no FSDP1 segments
            for name, param in self.model.named_parameters()
            if name.endswith("bias") and not any(name.startswith(w + ".") for w in wrappers)
        }

    def _mark_extra_trainable(self, config: LoraConfig) -> None:
        for param in self._bias_parameters(config).values():
            param.requires_grad_(True)

    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self._bias_parameters(self.peft_config[adapter_name]))

    def prepare_save(
        self, adapter_name: str, state: dict[str, torch.Tensor], config_fields: dict[str, Any], **save_options: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """With `path_initial_model_for_weight_conversion`, save PiSSA/OLoRA as plain LoRA (conversion.py)."""
        initial_dir = save_options.get("path_initial_model_for_weight_conversion")
        if initial_dir is None:
            return super().prepare_save(adapter_name, state, config_fields, **save_options)
        return convert_mutated_init_to_lora(
            self.peft_config[adapter_name], state, config_fields, initial_dir, save_options["read_weights"]
        )

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        # With bias="all", peft also writes the head's `original_module.bias` and an adapter-less
        # `modules_to_save.bias`; neither is used in forward (the copy's `<head>.bias` is).
        if self.peft_config[adapter_name].bias == "all":
            return (r".*\.original_module\.bias$", r".*\.modules_to_save\.bias$")
        return ()

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
        if any(getattr(self.peft_config[n], "use_dora", False) for n in set(adapter_names) & set(self.peft_config)):
            raise ConfigError(
                "Cannot pass `adapter_names` when DoRA is enabled. Mixed-adapter batches do not support DoRA "
                "adapters; run them one adapter at a time."
            )
        modules = [module for _, module in self.adapter_modules()]
        names = tuple(adapter_names)  # one immutable copy shared by every layer (their caches key on it)
        for module in modules:
            module.batch_adapter_names = names
        try:
            yield
        finally:
            for module in modules:
                module.batch_adapter_names = None

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """Add `adapter_name`, a weighted combination of `adapters` (see `weighted.add_weighted_adapter`).

        kwargs: combination_type ("svd" default, "linear", "cat", "ties", "dare_linear", "dare_ties",
        "magnitude_prune" and their "_svd" forms), svd_rank, svd_clamp, svd_full_matrices, svd_driver,
        density, majority_sign_method ("total" | "frequency").
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

