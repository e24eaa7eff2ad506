"""peft's functional API: adapters on a plain `nn.Module` (no PeftModel), for libraries that integrate
PEFT themselves (transformers' and diffusers' adapter methods work this way).

    inject_adapter_in_model(config, model)     wrap the targeted layers in place
    get_peft_model_state_dict / set_peft_model_state_dict
    set_adapter(model, name)                   the active adapter(s) of every adapter layer
    delete_adapter(model, name, prefix)        drop one adapter's tensors; the remaining active adapters
    set_requires_grad(model, names, flag)      gradients of the named adapters on / off
    cast_adapter_dtype(model, name)            fp16 / bf16 (and fp8) adapter tensors up to fp32

Each walks the model's modules, as peft's functions do; none needs a tuner.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch
from torch import nn

from .checkpoint.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .mapping import inject_adapter_in_model
from .tuners._core.layer import BaseTunerLayer
from .tuners._core.modules_to_save import AuxiliaryWrapper
from .tuners._core.tuner import adapter_modules_of, set_adapters_requires_grad

__all__ = [
    "cast_adapter_dtype",
    "delete_adapter",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_adapter",
    "set_peft_model_state_dict",
    "set_requires_grad",
]

#: Adapter dtypes `cast_adapter_dtype` upcasts to float32 (those this torch build has).
_LOW_PRECISION = tuple(
    dtype for dtype in (getattr(torch, name, None) for name in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"))
    if dtype is not None
)


def _adapter_modules(model: nn.Module, kinds: tuple[type, ...] = (BaseTunerLayer, AuxiliaryWrapper)) -> Iterator[tuple[str, nn.Module]]:
    """The tuner layers and auxiliary wrappers of `model` (as a tuner walks them) that are of `kinds`."""
    return ((name, module) for name, module in adapter_modules_of(model) if isinstance(module, kinds))


def set_adapter(
    model: nn.Module,
    adapter_name: Union[str, list[str]],
    inference_mode: bool = False,
    layer_cls: type = BaseTunerLayer,
) -> None:
    """Make `adapter_name` (one or several) active in every adapter layer of `model` (merged layers are
    unmerged first, with peft's warning); with `inference_mode`, they stay frozen."""
    for _, module in _adapter_modules(model, (AuxiliaryWrapper,)):
        module.set_adapter(adapter_name, inference_mode=inference_mode)
    for _, module in _adapter_modules(model, (layer_cls,)):
        if module.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            module.unmerge()
        module.set_adapter(adapter_name, inference_mode=inference_mode)


def delete_adapter(
    model: nn.Module, adapter_name: str, prefix: str, layer_cls: type = BaseTunerLayer
) -> Optional[list[str]]:
    """Delete `adapter_name` from every adapter layer (not from modules inside adapter containers, whose
    names hold `prefix`, e.g. "lora_"). Returns the adapters left active (None: no layer had any).

    The layers stay in place even when their last adapter goes, as in peft; `unload()` a PeftModel
    (or reload the base model) to remove them.
    """
    remaining: Optional[list[str]] = None
    for key, module in list(_adapter_modules(model, (layer_cls, AuxiliaryWrapper))):
        if prefix in key:
            continue
        module.delete_adapter(adapter_name)  # a wrapper re-points its own active adapter
        if remaining is None and isinstance(module, BaseTunerLayer):
            remaining = module.active_adapters[:]
    return remaining


def set_requires_grad(model: nn.Module, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
    """Gradients of the named adapters' trainable tensors on (default) or off; the others are left alone."""
    set_adapters_requires_grad(model, [adapter_names] if isinstance(adapter_names, str) else list(adapter_names),
                               requires_grad)


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast `adapter_name`'s low-precision float tensors (fp16, bf16, fp8) to float32, in every adapter
    layer (new Parameter objects: references to the old ones are not updated). Does nothing with
    `autocast_adapter_dtype=False`."""
    if not autocast_adapter_dtype:
        return
    for _, layer in _adapter_modules(model, (BaseTunerLayer,)):
        for container in layer.modules():
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                if item.dtype in _LOW_PRECISION:
                    container[adapter_name] = nn.Parameter(item.detach().float(), requires_grad=item.requires_grad)
                continue
            for tensor in (*item.parameters(), *item.buffers()):
                if tensor.dtype in _LOW_PRECISION:
                    tensor.data = tensor.data.float()
