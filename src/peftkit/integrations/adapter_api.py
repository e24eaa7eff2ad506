"""transformers' adapter API on a base model, done by peftkit (installed by `recognition.py` only where
transformers cannot use peft: not installed, or older than the installed transformers asks for).

    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter("path/to/adapter", adapter_name="sql")   # a peft / peftkit adapter folder
    model.add_adapter(LoraConfig(...), adapter_name="new")       # a fresh adapter to train
    model.set_adapter("sql"); model.disable_adapters(); model.enable_adapters()
    model.active_adapters(); model.get_adapter_state_dict("sql"); model.delete_adapter("new")

The adapters are injected into the model itself (no PeftModel wrapper), as transformers does with
peft; `model.peft_config` holds their configs. These functions become methods of transformers'
`PeftAdapterMixin` (their first argument is the model).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

METHODS = (
    "load_adapter", "add_adapter", "set_adapter", "disable_adapters", "enable_adapters", "active_adapters",
    "get_adapter_state_dict", "delete_adapter",
)


def _layers(model: nn.Module) -> list[Any]:
    from ..tuners._core.layer import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def _require_adapters(model: nn.Module) -> None:
    if not getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("No adapter loaded. Please load an adapter first.")


def _inject(model: nn.Module, config: Any, adapter_name: str) -> None:
    from .. import inject_adapter_in_model

    configs = dict(getattr(model, "peft_config", {}) if model._hf_peft_config_loaded else {})
    if adapter_name in configs:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    active = active_adapters(model) if configs else []
    inject_adapter_in_model(config, model, adapter_name)
    configs[adapter_name] = config
    model.peft_config = configs
    model._hf_peft_config_loaded = True
    if active:  # a further adapter does not change which are active (the new tuner activated its own)
        set_adapter(model, active)


def load_adapter(
    self: nn.Module,
    peft_model_id: Optional[str] = None,
    adapter_name: Optional[str] = None,
    peft_config: Optional[Union[dict, Any]] = None,
    adapter_state_dict: Optional[dict[str, torch.Tensor]] = None,
    low_cpu_mem_usage: bool = False,
    is_trainable: bool = False,
    adapter_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> Any:
    """Inject adapter `adapter_name` ("default") from a folder / hub repo, or from `peft_config` +
    `adapter_state_dict`; its weights are loaded strictly (a mismatch raises, nothing stays injected)."""
    from .. import PeftConfig, load_peft_weights, set_peft_model_state_dict
    from ..utils.constants import PEFT_MODEL_PREFIX

    adapter_name = adapter_name or "default"
    if peft_model_id is None and (adapter_state_dict is None or peft_config is None):
        raise ValueError(
            "You should either pass a `peft_model_id` or a `peft_config` and `adapter_state_dict` to load an adapter."
        )
    hub = {**(adapter_kwargs or {}), **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")}}
    if peft_config is None:
        config = PeftConfig.from_pretrained(peft_model_id, **hub)
    else:
        config = PeftConfig.from_peft_type(**peft_config) if isinstance(peft_config, dict) else peft_config
    config.inference_mode = not is_trainable
    weights = adapter_state_dict if adapter_state_dict is not None else load_peft_weights(peft_model_id, **hub)
    weights = {key.removeprefix(PEFT_MODEL_PREFIX): value for key, value in weights.items()}
    _inject(self, config, adapter_name)
    try:
        result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name, strict=True)
    except BaseException:
        delete_adapter(self, adapter_name)
        raise
    if not is_trainable:
        for param in (p for layer in _layers(self) for p in layer.adapter_params([adapter_name])):
            param.requires_grad_(False)
    return result


def add_adapter(self: nn.Module, adapter_config: Any, adapter_name: Optional[str] = None) -> None:
    """Inject a fresh adapter (to train) and activate it, as transformers does."""
    from .. import PeftConfig

    if not isinstance(adapter_config, PeftConfig):
        raise TypeError(f"adapter_config should be an instance of PeftConfig. Got {type(adapter_config)} instead.")
    adapter_name = adapter_name or "default"
    adapter_config.base_model_name_or_path = self.__dict__.get("name_or_path", None)
    _inject(self, adapter_config, adapter_name)
    set_adapter(self, adapter_name)


def set_adapter(self: nn.Module, adapter_name: Union[str, list[str]]) -> None:
    _require_adapters(self)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    missing = [name for name in names if name not in self.peft_config]
    if missing:
        raise ValueError(
            f"Following adapter(s) could not be found: {', '.join(missing)}. Make sure you are passing the correct "
            f"adapter name(s). current loaded adapters are: {list(self.peft_config.keys())}"
        )
    for layer in _layers(self):
        layer.set_adapter(names)


def disable_adapters(self: nn.Module) -> None:
    _require_adapters(self)
    for layer in _layers(self):
        layer.enable_adapters(False)


def enable_adapters(self: nn.Module) -> None:
    _require_adapters(self)
    for layer in _layers(self):
        layer.enable_adapters(True)


def active_adapters(self: nn.Module) -> list[str]:
    _require_adapters(self)
    layers = _layers(self)
    return list(layers[0].active_adapters) if layers else []


def get_adapter_state_dict(self: nn.Module, adapter_name: Optional[str] = None, state_dict: Optional[dict] = None) -> dict:
    """The adapter's tensors under the keys of its checkpoint file, without the `base_model.model.` prefix."""
    from .. import get_peft_model_state_dict

    _require_adapters(self)
    adapter_name = adapter_name or active_adapters(self)[0]
    return get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=adapter_name)


def delete_adapter(self: nn.Module, adapter_names: Union[str, list[str]]) -> None:
    """Remove the adapters' tensors from every layer; layers left without adapters are unwrapped."""
    from ..tuners._core.module_tree import get_submodules, replace_module

    _require_adapters(self)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [name for name in names if name not in self.peft_config]
    if missing:
        raise ValueError(f"The following adapter(s) are not present and cannot be deleted: {', '.join(missing)}")
    from ..tuners._core.layer import BaseTunerLayer

    for name in names:
        for key, layer in [(k, m) for k, m in self.named_modules() if isinstance(m, BaseTunerLayer)][::-1]:
            if name in layer.merged_adapters:
                layer.unmerge()
            layer.delete_adapter(name)
            if not layer.adapter_names():
                parent, _, child = get_submodules(self, key)
                replace_module(parent, child, layer.unwrapped())
        del self.peft_config[name]
    if not self.peft_config:
        self._hf_peft_config_loaded = False
