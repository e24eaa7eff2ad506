"""One symmetric mapping between a model's adapter tensors and peft's checkpoint keys.

`adapter_tensor_map(model, name)` walks the adapter-bearing modules and asks each for its keys
(adapter name removed, as in peft files), so saving reads the map and loading writes through
it -- there is no string surgery on state-dict keys in either direction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointShapeError
from ..tuners._core.layer import BaseTunerLayer
from ..tuners._core.modules_to_save import AuxiliaryWrapper
from ..utils.constants import PEFT_MODEL_PREFIX
from .embeddings import embedding_state_accepted, embedding_state_to_save


class IncompatibleKeys(NamedTuple):
    """Keys the model expected but the checkpoint lacks, and keys the model does not know."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _tuner_of(model: nn.Module) -> tuple[Optional[nn.Module], nn.Module, str]:
    """(tuner or None, module tree holding the adapters, key prefix) for a PeftModel or an injected model."""
    from ..tuners._core.tuner import BaseTuner

    model = _unwrap_parallel(model)
    base_model = model.__dict__.get("_modules", {}).get("base_model")
    if isinstance(base_model, BaseTuner):
        return base_model, base_model.model, PEFT_MODEL_PREFIX
    if isinstance(model, BaseTuner):
        return model, model.model, "model."
    return None, model, ""


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside FSDP1 / DDP / activation-checkpoint / torch.compile wrappers (e.g. the PeftModel)."""
    while True:
        children = model.__dict__.get("_modules", {})
        inner = next(
            (children[name] for name in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod") if name in children),
            None,
        )
        if inner is None and type(model).__name__ == "DistributedDataParallel":
            inner = children.get("module")
        if inner is None:
            return model
        model = inner


def _prompt_learning_tuner(model: nn.Module, adapter_name: str) -> Optional[nn.Module]:
    """The prompt-learning tuner holding `adapter_name`, or None (then keys map structurally)."""
    tuner, _, _ = _tuner_of(model)
    if getattr(tuner, "is_prompt_learning", False) and adapter_name in tuner.peft_config:
        return tuner
    return None


def adapter_tensor_map(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Checkpoint key -> live tensor for every tensor of `adapter_name` (the prefix included)."""
    tuner, tree, prefix = _tuner_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in tree.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryWrapper)):
            # Keys are checkpoint keys: FSDP1 / activation-checkpoint wrappers' segments are not part of them.
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            state.update(module.adapter_state(adapter_name, name))
    if tuner is not None and adapter_name in tuner.peft_config:
        state.update(tuner.extra_adapter_state(adapter_name))
    return {prefix + key: tensor for key, tensor in state.items()}


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: Any = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_name` under peft's checkpoint keys (detached).

    If `state_dict` is given (e.g. gathered by FSDP or DeepSpeed), values are taken from it by the
    parameters' in-model names instead of from the live tensors.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    prompt_tuner = _prompt_learning_tuner(model, adapter_name)
    if prompt_tuner is not None:  # one `prompt_embeddings` tensor (+ heads), see tuners/_prompt
        return prompt_tuner.prompt_learning_state_dict(adapter_name)
    live = adapter_tensor_map(model, adapter_name)
    tuner, tree, prefix = _tuner_of(model)
    config = (getattr(tuner, "peft_config", None) or getattr(tree, "peft_config", {})).get(adapter_name)
    if config is not None:
        extra = embedding_state_to_save(tree, config, save_embedding_layers)
        live.update({prefix + key: tensor for key, tensor in extra.items()})
    if state_dict is None:
        result = {key: tensor.detach() for key, tensor in live.items()}
    else:
        result = _take_from_state_dict(model, live, state_dict, adapter_name)
    if tuner is not None and adapter_name in tuner.peft_config:
        result = tuner.state_for_save(adapter_name, result, prefix)
    return result


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    """A parameter name without the segments DDP, FSDP1, checkpoint wrappers and torch.compile add."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name[len("module."):] if name.startswith("module.") else name


def _take_from_state_dict(
    model: nn.Module, live: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    """The adapter's tensors picked from a full state dict (e.g. gathered by FSDP), by parameter name."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    names = {id(tensor): _unwrapped_name(name) for name, tensor in named}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), _unwrapped_name(name))
    given = {_unwrapped_name(name): tensor for name, tensor in state_dict.items()}
    result = {key: given[names[id(t)]] for key, t in live.items() if names.get(id(t)) in given}
    if live and not result:
        raise CheckpointError(
            f"The state_dict passed to save adapter {adapter_name!r} holds none of its tensors (e.g. "
            f"{next(iter(live))}); pass the full state dict of this model, or use "
            "peftkit.distributed.save_pretrained_distributed under FSDP1."
        )
    return result


def _strip_prefix(keys: Mapping[str, torch.Tensor], expected_prefix: str) -> dict[str, torch.Tensor]:
    """Accept keys with or without `base_model.model.` (peft writes both kinds)."""
    out = {}
    for key, tensor in keys.items():
        bare = key[len(PEFT_MODEL_PREFIX):] if key.startswith(PEFT_MODEL_PREFIX) else key
        out[expected_prefix + bare] = tensor
    return out


def _optional_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """Keys of layers whose tensors checkpoints need not carry (`BaseTunerLayer.optional_in_checkpoints`)."""
    _, tree, prefix = _tuner_of(model)
    keys: set[str] = set()
    for name, module in tree.named_modules():
        if isinstance(module, BaseTunerLayer) and module.optional_in_checkpoints:
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            keys.update(prefix + key for key in module.adapter_state(adapter_name, name))
    return keys


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    strict: bool = False,
) -> IncompatibleKeys:
    """Copy checkpoint tensors into `adapter_name`'s live tensors.

    A shape mismatch raises `CheckpointShapeError` (a CheckpointError and a RuntimeError, as torch's
    "size mismatch") naming the tensor and both shapes (or is skipped
    with `ignore_mismatched_sizes`). With `strict`, missing or unexpected keys raise too;
    otherwise they are returned, like `nn.Module.load_state_dict(strict=False)`.
    """
    prompt_tuner = _prompt_learning_tuner(model, adapter_name)
    if prompt_tuner is not None:
        _check_values({key: (value, None) for key, value in peft_model_state_dict.items()})
        missing, unexpected = prompt_tuner.load_prompt_learning_state_dict(
            dict(peft_model_state_dict), adapter_name, ignore_mismatched_sizes
        )
        if strict and (missing or unexpected):
            raise CheckpointError(_describe_key_mismatch(missing, unexpected))
        return IncompatibleKeys(missing, unexpected)
    tuner, _, prefix = _tuner_of(model)
    incoming = _strip_prefix(peft_model_state_dict, prefix)
    # Optional tuner hook (looked up on the class: BaseTuner forwards unknown attributes to the model):
    # reshape layers to the checkpoint before loading, e.g. BOFT's number of butterfly factors.
    fit = getattr(type(tuner), "fit_to_checkpoint", None)
    if fit is not None and adapter_name in getattr(tuner, "peft_config", {}):
        fit(tuner, adapter_name, incoming, prefix)
    target = adapter_tensor_map(model, adapter_name)
    if tuner is not None and adapter_name in tuner.peft_config:
        incoming = tuner.checkpoint_for_load(adapter_name, incoming, prefix)
    tolerated = tuner.tolerated_checkpoint_keys(adapter_name) if tuner is not None else ()
    unexpected = sorted(k for k in incoming if k not in target and not any(re.match(p, k) for p in tolerated))
    optional_keys = _optional_keys(model, adapter_name)
    missing = sorted(k for k in target if k not in incoming and k not in optional_keys)
    # Full embedding matrices (peft's save_embedding_layers) are loaded when present, never required.
    optional = {prefix + key: tensor for key, tensor in embedding_state_accepted(_tuner_of(model)[1]).items()}
    if tuner is not None and unexpected:  # e.g. learnable biases (peft loads any key naming a model tensor)
        accepted = tuner.accepted_checkpoint_tensors(adapter_name)
        optional.update({prefix + key: tensor for key, tensor in accepted.items() if prefix + key in incoming})
    unexpected = [key for key in unexpected if key not in optional]
    target = {**target, **{key: tensor for key, tensor in optional.items() if key in incoming}}
    if strict and (missing or unexpected):
        raise CheckpointError(_describe_key_mismatch(missing, unexpected))
    _check_shapes(target, incoming, ignore_mismatched_sizes)
    loaded = {key: (incoming[key], tensor) for key, tensor in target.items() if key in incoming}
    _check_values({key: pair for key, pair in loaded.items() if pair[0].shape == pair[1].shape})  # what is copied
    on_meta: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, tensor in target.items():
            if key in incoming and incoming[key].shape == tensor.shape:
                if tensor.is_meta:  # created with low_cpu_mem_usage=True: nothing to copy into
                    on_meta[id(tensor)] = incoming[key]
                else:
                    tensor.copy_(incoming[key])
    if on_meta:
        _assign(_tuner_of(model)[1], on_meta, None)
    return IncompatibleKeys(missing, unexpected)


def _assign(module: nn.Module, values: dict[int, torch.Tensor], device: Optional[torch.device]) -> None:
    """Replace the meta parameters whose id is in `values` by new parameters holding those values.

    Each keeps its meta tensor's dtype (the adapter's dtype rule) and goes to the device of the
    base layer of its tuner layer: peft's `load_state_dict(assign=True)` and move to the base device.
    """
    if isinstance(module, BaseTunerLayer):
        base = module.get_base_layer()
        device = next((t.device for t in (*base.parameters(), *base.buffers()) if not t.is_meta), device)
    for name, param in list(module._parameters.items()):
        if param is not None and id(param) in values:
            value = values.pop(id(param)).to(device=device, dtype=param.dtype)
            module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
    for child in module.children():
        if values:
            _assign(child, values, device)


def _check_shapes(target: Mapping[str, torch.Tensor], incoming: Mapping[str, torch.Tensor], ignore: bool) -> None:
    for key, tensor in target.items():
        if key in incoming and incoming[key].shape != tensor.shape and not ignore:
            raise CheckpointShapeError(
                f"size mismatch for {key}: the checkpoint has shape {tuple(incoming[key].shape)}, the model "
                f"expects {tuple(tensor.shape)}. The adapter config (r, target_modules) does not match its "
                "weights, or the adapter was trained on another base model (a resized embedding: pass "
                "ignore_mismatched_sizes=True to skip such tensors)."
            )


def _check_values(pairs: Mapping[str, tuple[torch.Tensor, Optional[torch.Tensor]]]) -> None:
    """Refuse, before anything is written, checkpoint tensors that would silently break the model.

    `pairs`: key -> (checkpoint tensor, the model tensor it is loaded into, or None when unknown).
    A float model tensor takes only a floating checkpoint tensor (any float dtype: fp16/bf16 are
    legal); integer / bool tensors load only into integer / bool model tensors (quantization
    state and the like, left as they are). Floating checkpoint tensors must be finite.
    """
    wrong_dtype = [
        f"{key} ({value.dtype}, the model's is {live.dtype})"
        for key, (value, live) in pairs.items()
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()
        and live is not None and (live.is_floating_point() or live.is_complex())
    ]
    if wrong_dtype:
        raise CheckpointError(
            f"Adapter weights of the wrong dtype: {_shown(wrong_dtype)}. Adapter tensors are floating point "
            "(float32/float16/bfloat16); the file was written by something else or is damaged: re-save the adapter "
            "from its model. Nothing was loaded."
        )
    non_finite = [
        key
        for key, (value, _) in pairs.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta
        and not bool(torch.isfinite(value).all())
    ]
    if non_finite:
        raise CheckpointError(
            f"Adapter weights hold NaN/inf values: {_shown(non_finite)}. The file is damaged or training diverged; "
            "re-save the adapter from a healthy checkpoint (e.g. an earlier step). Nothing was loaded."
        )


def _shown(keys: list[str]) -> str:
    """The first 8 keys, and how many there are in all when more."""
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _describe_key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_shown(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_shown(unexpected)}")
    return (
        "The adapter weights do not fit this model (" + "; ".join(parts) + "). Was it trained on another "
        "base model, or with other target_modules?"
    )


# ---------------------------------------------------------------------- peft's other save_and_load names
def load_peft_weights(
    model_id: str, device: Optional[str] = None, key_mapping: Optional[Mapping[str, str]] = None, **hf_hub_download_kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter (local folder or hub repo), as peft's `load_peft_weights`.

    `adapter_model.safetensors` is preferred over `adapter_model.bin` (read weights-only). `device`
    defaults to the accelerator when there is one (as in peft), else "cpu". `key_mapping` (regex ->
    replacement, first match per key) renames keys after their `base_model.model.` / `base_model.`
    prefix is set aside. Other keywords are hub arguments (`subfolder`, `revision`, `token`, ...).
    """
    from .adapter_folder import read_adapter_weights

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = read_adapter_weights(model_id, device=str(device), **hf_hub_download_kwargs)
    if not key_mapping:
        return weights
    remapped: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        prefix = next((p for p in (PEFT_MODEL_PREFIX, "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(
                f"load_peft_weights(key_mapping=...): key {key!r} does not start with 'base_model.'; "
                "this is not a PeftModel state dict."
            )
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, rest)
            if count:
                rest = renamed
                break
        remapped[prefix + rest] = value
    return remapped


from .base_state_dict import get_base_model_state_dict, set_base_model_state_dict  # noqa: E402  (re-export)
