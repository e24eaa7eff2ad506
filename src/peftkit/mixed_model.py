"""`PeftMixedModel`: adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA) on one
model, active together.

    y = W x + sum over active adapters a of delta_a(x)        (each by its own method)

peft's `get_peft_model(model, config, mixed=True)`. Each method's adapters are injected by that
method's own tuner (`MixedModel` keeps one per method, all over the same model); a module targeted
by two methods gets nested layers (the later method's layer wraps the earlier one's), and every
layer adds its own update, so the order of nesting does not change the sum. Switching, disabling,
merging, unloading and deleting work on all layers at once through the shared tuner walk (which
follows nested layers). OFT rotates the input of what it wraps, so with OFT the nesting order is
part of the function (as in peft); SHiRA must be the first method on a layer (it refuses nested
bases, as peft's does).

As in peft: several adapters may be active at once across methods (`set_adapter([...])`), adapters
are loaded from the single-method folders that `PeftModel.save_pretrained` writes
(`load_adapter` / `from_pretrained`), and a mixed model is not saved as one (`save_pretrained`
raises: save each adapter from a `PeftModel`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint.adapter_folder import read_adapter
from .checkpoint.io import hub_kwargs_of
from .checkpoint.state_dict import adapter_tensor_map, set_peft_model_state_dict
from .config import PeftConfig
from .errors import AdapterNameError, ConfigError
from .peft_model import PeftModel
from .registry import method_spec
from .tuners._core.tuner import BaseTuner
from .utils.adapter_names import validate_adapter_name
from .utils.peft_types import PeftType

#: The methods a mixed model combines (peft's list).
COMPATIBLE_TUNER_TYPES = (PeftType.LORA, PeftType.LOHA, PeftType.LOKR, PeftType.ADALORA, PeftType.OFT, PeftType.SHIRA)


def _check_config_compatible(config: PeftConfig) -> None:
    if config.peft_type not in COMPATIBLE_TUNER_TYPES:
        raise ConfigError(
            f"The provided `peft_type` '{config.peft_type.value}' is not compatible with the `PeftMixedModel`; "
            f"mixed models combine {[t.value for t in COMPATIBLE_TUNER_TYPES]} adapters."
        )


class MixedModel(BaseTuner):
    """The tuner of a `PeftMixedModel`: each method's adapters go through that method's tuner."""

    display_name = "mixed"

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        object.__setattr__(self, "_method_tuners", {})  # not submodules: they wrap the same model
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def add_adapter(
        self, adapter_name: str, config: Any, low_cpu_mem_usage: bool = False, state_dict: Optional[Any] = None
    ) -> None:
        """Inject `config` with its method's tuner; the other adapters' active state is kept."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"Adapter with name '{adapter_name}' already exists; pick another name.")
        _check_config_compatible(config)
        active = [name for name in self.active_adapters if name in self.peft_config]
        tuner = self._method_tuners.get(config.peft_type)
        if tuner is None:
            tuner = method_spec(config.peft_type).tuner_cls(self.model, {adapter_name: config}, adapter_name,
                                                            low_cpu_mem_usage=low_cpu_mem_usage)
            self._method_tuners[config.peft_type] = tuner
        else:
            tuner.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.peft_config[adapter_name] = tuner.peft_config[adapter_name]
        self.model.peft_config = self.peft_config
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(tuner.targeted_module_names))
        # The method's tuner switched every layer to its own active adapters; put the model's back.
        for _, module in self.adapter_modules():
            module.set_adapter(active or [adapter_name])
        self._mark_only_adapters_as_trainable()

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_adapter_exists(names, "not found")
        for name in names:
            tuner = self._method_tuners[self.peft_config[name].peft_type]
            super().delete_adapter(name)
            tuner.peft_config.pop(name, None)
        self.model.peft_config = self.peft_config

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("Weighted adapters are not supported for MixedModel (yet).")


class PeftMixedModel(nn.Module):
    """A model with adapters of several methods; see the module docstring. Built by
    `get_peft_model(model, config, mixed=True)` or `PeftMixedModel.from_pretrained(model, folder)`."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_config_compatible(peft_config)
        self.base_model = MixedModel(model, {adapter_name: peft_config}, adapter_name)
        self.config = getattr(model, "config", {"model_type": "custom"})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ state (as a PeftModel's)
    peft_config = PeftModel.peft_config
    active_adapter = PeftModel.active_adapter
    active_adapters = PeftModel.active_adapters
    modules_to_save = PeftModel.modules_to_save
    get_nb_trainable_parameters = PeftModel.get_nb_trainable_parameters
    print_trainable_parameters = PeftModel.print_trainable_parameters
    get_base_model = PeftModel.get_base_model

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model's output."""
        with self.base_model._adapters_disabled():
            yield

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an (untrained, inactive) adapter of any compatible method; `set_adapter` activates it."""
        self.base_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.base_model.cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate these adapters (of any methods) together; the order of the forward is the nesting order."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        self.base_model.delete_adapter(adapter_name)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def get_layer_status(self) -> list[Any]:
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        from .status import get_model_status

        return get_model_status(self)

    # ------------------------------------------------------------------ files
    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any:
        """Add adapter `adapter_name` from a single-method adapter folder (what `PeftModel.save_pretrained` writes)."""
        validate_adapter_name(adapter_name)
        checkpoint = read_adapter(model_id, read_config=True, device=kwargs.get("torch_device"), **hub_kwargs_of(kwargs))
        config = PeftConfig.from_dict(checkpoint.config)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False))
        try:
            weights = _keys_for_nested_layers(self, adapter_name, checkpoint.weights)
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name, strict=True)
        except BaseException:
            self.base_model.delete_adapter(adapter_name)
            raise
        self.set_adapter(self.active_adapters)
        return result

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                        config: Optional[PeftConfig] = None, **kwargs: Any) -> "PeftMixedModel":
        """A mixed model whose first adapter comes from `model_id` (more: `load_adapter`)."""
        checkpoint = read_adapter(model_id, read_config=config is None, **hub_kwargs_of(kwargs))
        config = PeftConfig.from_dict(checkpoint.config) if config is None else config
        config.inference_mode = not is_trainable
        mixed = cls(model, config, adapter_name)
        set_peft_model_state_dict(mixed, _keys_for_nested_layers(mixed, adapter_name, checkpoint.weights),
                                  adapter_name=adapter_name, strict=True)
        if not is_trainable:
            mixed.eval()
        return mixed

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "Saving is not supported for PeftMixedModel (yet): save each adapter from a PeftModel of its method, "
            "and combine the folders with PeftMixedModel.from_pretrained / load_adapter."
        )

    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError("Model card creation is not supported for PeftMixedModel (yet).")


def _keys_for_nested_layers(model: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single-method checkpoint names `<module>.lora_A.weight`; in a mixed model that layer may sit
    inside another method's (`<module>.base_layer.lora_A.weight`). Map each key to where it lives."""
    live = {re.sub(r"\.base_layer(?=\.)", "", key): key for key in adapter_tensor_map(model, adapter_name)}
    return {live.get(key, key): value for key, value in weights.items()}

