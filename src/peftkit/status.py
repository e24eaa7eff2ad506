"""`get_layer_status` / `get_model_status`: what each adapter layer of a model is doing, as peft reports it.

The dataclasses have peft's fields (`peft.peft_model.TunerLayerStatus` / `TunerModelStatus`), so
code that reads peft's report reads ours. A value that differs between layers, where it should not,
is reported as `"irregular"` (the model is in an inconsistent state).
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import nn

from .errors import ConfigError
from .tuners._core.layer import BaseTunerLayer
from .tuners._core.modules_to_save import AuxiliaryWrapper
from .tuners._core.tuner import BaseTuner

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _all_or_irregular(values: list) -> Union[bool, Irregular]:
    if all(value is True for value in values):
        return True
    if all(value is False for value in values):
        return False
    return "irregular"


def _per_adapter_tensors(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    """adapter name -> its trainable tensors in this layer (a modules_to_save copy: its parameters)."""
    found: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    if isinstance(module, AuxiliaryWrapper):
        for name in module.held_adapters():
            found[name].extend(module.adapter_tensors(name))
        return found
    for attr in module.adapter_layer_names:
        container = getattr(module, attr, None)
        if isinstance(container, nn.ModuleDict):
            for name, sub in container.items():
                found[name].extend(sub.parameters())
        elif isinstance(container, nn.ParameterDict):
            for name, param in container.items():
                found[name].append(param)
    return found


def _quantization_backend(module: nn.Module) -> Optional[str]:
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else getattr(module, "original_module", module)
    kind = type(base).__name__
    from_bnb = type(base).__module__.startswith("bitsandbytes")
    if kind == "Linear4bit":
        return "bnb 4bit" if from_bnb else "peftkit 4bit"
    if kind in ("Linear8bitLt", "Linear8bit"):
        return "bnb 8bit" if from_bnb else "peftkit 8bit"
    return None


def _adapter_root(model: nn.Module) -> nn.Module:
    base = model.__dict__.get("_modules", {}).get("base_model")
    if base is not None and hasattr(model, "peft_config"):  # a PeftModel
        if not isinstance(base, BaseTuner) or getattr(base, "is_prompt_learning", False):
            raise TypeError(
                "get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption prompt are not supported."
            )
        return base
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per adapter layer (and per `modules_to_save` wrapper) of `model`.

    `model` is a PeftModel, or any module with adapters injected (`inject_adapter_in_model`). Raises
    `ValueError` when the model holds no adapter layer.
    """
    root = _adapter_root(model)
    layers: list[TunerLayerStatus] = []
    for name, module in root.named_modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryWrapper)):
            continue
        tensors = _per_adapter_tensors(module)
        if isinstance(module, AuxiliaryWrapper):
            available = sorted(module.held_adapters())
            merged: list[str] = []
        else:
            available = sorted(module.adapter_names())
            merged = list(module.merged_adapters)
        layers.append(
            TunerLayerStatus(
                name=name,
                module_type=repr(module).partition("(")[0],
                enabled=not module.disable_adapters,
                active_adapters=list(module.active_adapters),
                merged_adapters=merged,
                requires_grad={key: _all_or_irregular([t.requires_grad for t in ts]) for key, ts in tensors.items()},
                available_adapters=available,
                devices={key: sorted({t.device.type for t in ts}) for key, ts in tensors.items()},
                quantization_backend=_quantization_backend(module),
            )
        )
    if not layers:
        raise ConfigError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return layers


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        count = param.numel() * getattr(param, "peftkit_numel_factor", 1)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, summarised over `get_layer_status(model)` (peft's report)."""
    PreTrainedModel = _pretrained_model_class()

    root = _adapter_root(model)
    if root is not model:  # a PeftModel
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {name: str(getattr(c.peft_type, "value", c.peft_type)) for name, c in root.peft_config.items()}
        adapter_model_type = type(root).__name__
    else:
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable, total = _parameter_counts(model)
        peft_types, adapter_model_type = {}, "None"

    layers = get_layer_status(model)
    enabled_values = {status.enabled for status in layers}
    enabled: Union[bool, Irregular] = enabled_values.pop() if len(enabled_values) == 1 else "irregular"
    available = sorted(set().union(*(status.available_adapters for status in layers)))

    active_sets = {tuple(status.active_adapters) for status in layers}
    active: Union[list[str], Irregular] = list(active_sets.pop()) if len(active_sets) == 1 else "irregular"

    # An adapter merged in one layer but present and unmerged in another: inconsistent.
    merged_anywhere = set().union(*(status.merged_adapters for status in layers))
    merged: Union[list[str], Irregular] = sorted(merged_anywhere)
    for status in layers:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged_anywhere:
            merged = "irregular"
            break

    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            grads[key].append(value)
        for key, value in status.devices.items():
            devices[key].update(value)
    backends = {status.quantization_backend for status in layers}

    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={key: _all_or_irregular(values) for key, values in grads.items()},
        available_adapters=available,
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )


def _pretrained_model_class() -> tuple:
    """`(transformers.PreTrainedModel,)` if transformers' modeling code is loaded, else `()`: a model can
    only be a PreTrainedModel once it is, and importing it costs seconds (a save must not pay that)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    cls = getattr(modeling, "PreTrainedModel", None)
    return (cls,) if cls is not None else ()
