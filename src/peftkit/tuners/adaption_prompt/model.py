"""`AdaptionPromptModel`: the adaption-prompt tuner -- wraps the top `adapter_layers` attention modules.

The targets are the modules whose path ends with `.<target_modules>` (one per decoder layer, in
model order); the last `adapter_layers` of them are wrapped in `AdaptedAttention`. Several adapters
may be added (each with its own layers and prompt length); one is active at a time, as in peft.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import nn

from ...errors import AdapterStateError, ConfigError, TargetModulesError
from ...utils.adapter_names import adapter_name_list
from .._core.layer import BaseTunerLayer
from .._core.modules_to_save import AuxiliaryWrapper
from .._core.module_tree import get_submodules
from .._core.size_limits import ELEMENTS_FACTOR, element_limit
from .._core.tuner import BaseTuner
from .config import AdaptionPromptConfig
from .layer import ATTENTION_KINDS, AdaptedAttention

NOT_MERGEABLE = (
    "Adaption prompts cannot be merged into the base weights: they are extra attention over learned tokens, "
    "not a weight update. Keep the PeftModel for inference, or call unload() to get the base model back."
)


class AdaptionPromptModel(BaseTuner):
    """Creates adaption prompts on a llama / mistral / gpt2 model: `AdaptionPromptModel(model, config, "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "adaption_"
    default_target_modules = {model_type: kind.target_modules for model_type, kind in ATTENTION_KINDS.items()}
    layer_cls = AdaptedAttention
    display_name = "AdaptionPrompt"
    supported_layers = "the attention modules of " + ", ".join(sorted(ATTENTION_KINDS)) + " models"

    # ------------------------------------------------------------------ targets
    def _prepare_adapter_config(self, config: AdaptionPromptConfig) -> AdaptionPromptConfig:
        """A copy of `config` with target_modules resolved for the model type (peft's `prepare_config`)."""
        import dataclasses

        model_type = self._model_type()
        if model_type not in ATTENTION_KINDS:
            raise ConfigError(
                f"Unsupported model type for adaption prompt: '{model_type}'. Adaption prompts support the "
                f"model types {sorted(ATTENTION_KINDS)}."
            )
        config.require_sizes()
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=ATTENTION_KINDS[model_type].target_modules)
        return dataclasses.replace(config)

    def _target_keys(self, config: AdaptionPromptConfig) -> list[str]:
        """The paths of the attention modules to wrap: the last `adapter_layers` ending with `.<target_modules>`."""
        suffix = "." + config.target_modules
        found, inside = [], None
        for name, module in self.model.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            inside = name + "." if isinstance(module, (BaseTunerLayer, AuxiliaryWrapper)) else None
            if name.endswith(suffix):
                found.append(name)
        if not found:
            raise TargetModulesError(
                f"No module of {type(self.model).__name__} ends with {suffix!r}; target_modules names the attention "
                f"submodule of each decoder layer (e.g. {ATTENTION_KINDS[self._model_type()].target_modules!r})."
            )
        if len(found) < config.adapter_layers:
            raise ConfigError(
                f"Config specifies more adapter layers '{config.adapter_layers}' than the model has '{len(found)}'. "
                f"Use adapter_layers <= {len(found)}."
            )
        return found[-config.adapter_layers:]

    def layer_kwargs(self, config: AdaptionPromptConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"adapter_len": config.adapter_len, "inference_mode": config.inference_mode}

    def _inject(self, adapter_name: str, config: AdaptionPromptConfig, targets: Optional[set[str]] = None) -> None:
        """Wrap (or extend) the top `adapter_layers` attention modules; everything is checked before the first."""
        keys = self._target_keys(config)
        model_type = self._model_type()
        for key in keys:
            _, target, _ = get_submodules(self.model, key)
            _check_size(config, key, target)
        for key in keys:
            parent, target, target_name = get_submodules(self.model, key)
            if isinstance(target, AdaptedAttention):
                target.update_layer(adapter_name, **self.layer_kwargs(config, adapter_name, key, target))
            else:
                layer = AdaptedAttention(target, adapter_name, model_type, **self.layer_kwargs(config, adapter_name, key, target))
                setattr(parent, target_name, layer)
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(keys))

    # ------------------------------------------------------------------ one adapter at a time (as peft)
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = adapter_name_list(adapter_name, self.peft_config)
        if len(names) != 1:
            raise ConfigError(f"Adaption prompts use one adapter at a time; got {adapter_name!r}. Pass one name.")
        super().set_adapter(names[0], inference_mode=inference_mode)

    def _check_merge_allowed(self) -> None:
        raise AdapterStateError(NOT_MERGEABLE)

    def unmerge_adapter(self) -> None:
        raise AdapterStateError(NOT_MERGEABLE)


def _check_size(config: AdaptionPromptConfig, key: str, attention: nn.Module) -> None:
    """ConfigError for an implausibly long prompt (elements beyond the size limit of the attention module)."""
    hidden = getattr(getattr(attention, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        return
    base_elements = sum(p.numel() for p in attention.parameters())
    added, limit = config.adapter_len * hidden, element_limit(base_elements)
    if added > limit:
        raise ConfigError(
            f"adapter_len={config.adapter_len} would add about {added:,} prompt elements to {key!r} ({base_elements:,} "
            f"elements); peftkit refuses more than max({ELEMENTS_FACTOR} x the module, 2**26) = {limit:,} as "
            "implausible (an untrusted or damaged config?). Use a realistic adapter_len, e.g. 10."
        )
