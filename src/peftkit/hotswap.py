"""Hot-swapping LoRA adapters in place, so a compiled model keeps its compiled graph.

`prepare_model_for_compiled_hotswap` pads every adapter to a common rank (zero rows/columns do not
change the output) and turns each scaling into a 0-dim tensor. After that, `hotswap_adapter`
only copies tensors into the existing parameters and fills the scaling tensors in place, so
torch.compile's guards (shapes, Python constants) still hold and nothing is recompiled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint.adapter_folder import read_adapter
from .checkpoint.state_dict import _strip_prefix, _tuner_of, adapter_tensor_map
from .config import PeftConfig
from .errors import AdapterStateError, CheckpointError, ConfigError
from .tuners._core.matching import pattern_value
from .tuners.lora.layer import LoraLayer


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    tuner, _, _ = _tuner_of(model)
    if tuner is None:
        raise ConfigError("Hot-swapping needs a PeftModel (or a LoraModel) holding LoRA adapters.")
    return [(name, layer) for name, layer in tuner.tuner_layers() if isinstance(layer, LoraLayer)]


def _pad_rank(layer: LoraLayer, adapter_name: str, rank: int) -> None:
    current = layer.r[adapter_name]
    if current > rank:
        raise ConfigError(f"target_rank={rank} is below the rank {current} of adapter {adapter_name!r}; raise target_rank.")
    if current == rank or adapter_name not in layer.lora_A:
        return
    weight_a, weight_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    pad_a = weight_a.new_zeros((rank - current,) + weight_a.shape[1:])
    pad_b = weight_b.new_zeros((weight_b.shape[0], rank - current) + weight_b.shape[2:])
    weight_a.data = torch.cat([weight_a.data, pad_a], dim=0)
    weight_b.data = torch.cat([weight_b.data, pad_b], dim=1)
    for module, features in ((layer.lora_A[adapter_name], "out_features"), (layer.lora_B[adapter_name], "in_features")):
        for attr in (features, "out_channels" if features == "out_features" else "in_channels"):
            if hasattr(module, attr):
                setattr(module, attr, rank)
    layer.r[adapter_name] = rank


def prepare_model_for_compiled_hotswap(
    model: nn.Module, target_rank: Optional[int] = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Pad all LoRA adapters to `target_rank` and make their scalings tensors; call before torch.compile."""
    if hasattr(model, "_orig_mod"):
        if check_compiled == "error":
            raise AdapterStateError("Call prepare_model_for_compiled_hotswap before torch.compile, not after.")
    for _, layer in _lora_layers(model):
        for adapter_name in list(layer.r):
            if target_rank is not None:
                _pad_rank(layer, adapter_name, target_rank)
            scaling = layer.scaling[adapter_name]
            if not isinstance(scaling, torch.Tensor):
                layer.scaling[adapter_name] = torch.tensor(float(scaling), device=layer.get_base_layer().weight.device)


def _new_scaling(config: Any, key: str) -> float:
    rank = pattern_value(config.rank_pattern or {}, key, config.r)
    alpha = pattern_value(config.alpha_pattern or {}, key, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _fits(live: torch.Tensor, new: torch.Tensor, key: str) -> int:
    """The rank dimension `new` fills in `live` (-1: same shape); a CheckpointError where it cannot fit."""
    if new.shape == live.shape:
        return -1
    rank_dim = 0 if ".lora_A" in key or key.endswith("lora_embedding_A") else 1
    fits = new.dim() == live.dim() and all(
        n == l or (d == rank_dim and n < l) for d, (n, l) in enumerate(zip(new.shape, live.shape))
    )
    if not fits:
        raise CheckpointError(
            f"Cannot hot-swap {key}: the new adapter has shape {tuple(new.shape)}, the loaded one {tuple(live.shape)}. "
            "Only a rank up to the loaded (padded) rank fits; use prepare_model_for_compiled_hotswap(target_rank=...)."
        )
    return rank_dim


def _check_values(new: torch.Tensor, key: str) -> None:
    """A hot-swapped tensor must be floating point and finite (as every loaded adapter tensor)."""
    if not new.is_floating_point():
        raise CheckpointError(
            f"Cannot hot-swap {key}: the new adapter's tensor has dtype {new.dtype}, but LoRA weights are floating "
            "point (float32/float16/bfloat16); re-save the adapter from its model. Nothing was swapped."
        )
    if not bool(torch.isfinite(new).all()):
        raise CheckpointError(
            f"Cannot hot-swap {key}: the new adapter's tensor holds NaN/inf values (a damaged file, or training "
            "diverged); re-save it from a healthy checkpoint. Nothing was swapped."
        )


def _write_padded(live: torch.Tensor, new: torch.Tensor, rank_dim: int) -> None:
    """Copy `new` into `live`; a smaller rank fills the leading rows (A) or columns (B), zeros elsewhere."""
    if rank_dim < 0:
        live.copy_(new)
        return
    live.zero_()
    live.narrow(rank_dim, 0, new.shape[rank_dim]).copy_(new)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: Optional[str] = None, **kwargs: Any) -> None:
    """Replace the weights of loaded LoRA adapter `adapter_name` by those of another saved adapter.

    No module is re-injected: tensors are copied in place and scalings updated. Layers the new
    adapter does not target are zeroed. Raises if the new adapter targets a module the loaded one
    does not, or needs a larger rank.
    """
    tuner, _, _ = _tuner_of(model)
    if tuner is None or adapter_name not in tuner.peft_config:
        raise AdapterStateError(f"No loaded adapter named {adapter_name!r} to hot-swap; load one first.")
    checkpoint = read_adapter(model_name_or_path, device=torch_device, **kwargs)  # the folder / hub located once
    config = PeftConfig.from_dict(checkpoint.config)
    hotswap_adapter_from_state_dict(model, checkpoint.weights, adapter_name, config)


#: Config fields that must agree for a hot-swap (peft's list): the loaded layers keep these.
CONFIG_KEYS_TO_CHECK = {"LORA": ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")}


def check_hotswap_configs_compatible(config0: Any, config1: Any) -> None:
    """ConfigError (a ValueError, as peft's) unless the two configs can be hot-swapped: the same method,
    one hot-swapping supports, and equal values of the fields the loaded layers keep (dropout module,
    DoRA, rsLoRA, per-module alphas). Ranks and alpha may differ (scalings are rewritten)."""
    type0, type1 = str(config0.peft_type), str(config1.peft_type)
    if type0 != type1:
        raise ConfigError(f"Incompatible PEFT types found: {type0} and {type1}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise ConfigError(f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK)} but {type0} was passed.")
    fields0, fields1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        value0, value1 = fields0.get(key, missing), fields1.get(key, missing)
        if value0 != value1:
            raise ConfigError(f"Configs are incompatible: for {key}, {value0} != {value1}")


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, config: Any, parameter_prefix: str = "lora_"
) -> None:
    """`hotswap_adapter` for weights in memory: `state_dict` under peft's file keys (or with the adapter
    name in them, as peft's function takes), `config` the new adapter's LoraConfig.

    All or nothing: every tensor is checked (keys, shapes, floating dtype, finite values) before any
    is written, so a refused swap leaves the loaded adapter exactly as it was.
    """
    tuner, _, prefix = _tuner_of(model)
    if tuner is None or adapter_name not in tuner.peft_config:
        raise AdapterStateError(f"No loaded adapter named {adapter_name!r} to hot-swap; load one first.")
    if str(config.peft_type) != "LORA" or str(tuner.peft_config[adapter_name].peft_type) != "LORA":
        raise ConfigError("Hot-swapping supports LoRA adapters only.")
    check_hotswap_configs_compatible(tuner.peft_config[adapter_name], config)
    if any(adapter_name in layer.merged_adapters for _, layer in _lora_layers(model)):
        raise AdapterStateError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. "
            "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`."
        )
    live = adapter_tensor_map(model, adapter_name)
    incoming = _file_keys(_strip_prefix(state_dict, prefix), live, adapter_name, parameter_prefix)
    unexpected = sorted(set(incoming) - set(live))
    if unexpected:
        raise CheckpointError(f"Cannot hot-swap: the new adapter has weights for modules the loaded one lacks: {unexpected[:5]}.")
    plan = []  # (live tensor, new tensor or None (zeroed), rank dim): every check passes before any write
    for key, tensor in live.items():
        if key not in incoming:
            plan.append((tensor, None, -1))
            continue
        new = incoming[key]
        _check_values(new, key)
        plan.append((tensor, new, _fits(tensor, new, key)))
    scalings = [(layer, _new_scaling(config, name)) for name, layer in _lora_layers(model)]
    with torch.no_grad():
        for tensor, new, rank_dim in plan:
            if new is None:
                tensor.zero_()
            else:
                _write_padded(tensor, new.to(tensor.device, tensor.dtype), rank_dim)
        for layer, value in scalings:
            _set_scaling(layer, adapter_name, value)
    tuner.peft_config[adapter_name] = config.__class__.from_dict({**config.to_dict(), "inference_mode": True})


def _file_keys(
    incoming: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor], adapter_name: str, parameter_prefix: str
) -> dict[str, torch.Tensor]:
    """Keys as in adapter files: `...lora_A.<adapter_name>.weight` (peft's in-model form) -> `...lora_A.weight`."""
    named = re.compile(rf"(\.{re.escape(parameter_prefix)}[^.]*)\.{re.escape(adapter_name)}(?=\.|$)")
    return {key if key in live else named.sub(r"\1", key): value for key, value in incoming.items()}


def _set_scaling(layer: LoraLayer, adapter_name: str, value: float) -> None:
    current = layer.scaling.get(adapter_name)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        layer.scaling[adapter_name] = value
