"""Fitting peftkit models into torch.distributed: DDP, FSDP1 (`FullyShardedDataParallel`) and FSDP2 (`fully_shard`).

peftkit does not run its own engine. This module gives the three things the engines need from us:

- `fsdp_auto_wrap_policy(model)`: an FSDP1 auto-wrap policy (the one peft ships) that gives every
  decoder layer its own unit and every leaf module with a trainable weight (LoRA A/B,
  modules_to_save copies) its own unit, so no flat parameter mixes frozen and trainable tensors.
- `shard_peft_model(model)`: the FSDP2 equivalent, `fully_shard` on each decoder layer then the root.
- `gather_adapter_state_dict(model)` / `save_pretrained_distributed(model, dir)`: collect the
  adapter's full tensors from the shards on every rank (a collective), then let rank 0 write.

Everything here is a collective when the model is sharded: call it on every rank, in the same order.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

import torch
from torch import nn

from .checkpoint.state_dict import adapter_tensor_map, get_peft_model_state_dict
from .registry import registered_methods

# Attribute names that torch's wrappers put between a module and its children.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrapper_prefixes(name: str) -> str:
    """`name` without the segments that DDP/FSDP1/checkpoint/compile wrappers insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name.removeprefix("module.")


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / an FSDP1 root / `torch.compile` wrappers (the PeftModel itself)."""
    while True:
        inner = getattr(model, "module", None) if _is_wrapper(model) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _is_wrapper(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel) or _is_fsdp1(model)


def _is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _uses_fsdp1(model: nn.Module) -> bool:
    return any(_is_fsdp1(module) for module in model.modules())


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ---------------------------------------------------------------------------------------- wrapping
def _layer_classes_to_wrap(model: nn.Module) -> set[type]:
    """Decoder-layer classes (`_no_split_modules`, or `FSDP_TRANSFORMER_CLS_TO_WRAP`) + methods' `fsdp_wrap_classes`.

    The registry's `MethodSpec.fsdp_wrap_classes` are the prompt encoders of the prompt-learning methods.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    env_names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if env_names is not None:
        names = {name for name in env_names.split(",") if name}
    classes_by_name = {type(module).__name__: type(module) for module in model.modules()}
    missing = sorted(name for name in names if name not in classes_by_name)
    if env_names is not None and missing:
        raise TypeError(f"FSDP_TRANSFORMER_CLS_TO_WRAP names {missing}, which are not module classes of this model.")
    method_classes = {cls for spec in registered_methods() for cls in spec.fsdp_wrap_classes}
    return {classes_by_name[name] for name in names if name in classes_by_name} | method_classes


def _has_trainable_weight(module: nn.Module) -> bool:
    """A leaf with a trainable `weight`: LoRA's A/B linears, a modules_to_save copy's leaves."""
    weight = getattr(module, "weight", None)
    return next(module.children(), None) is None and isinstance(weight, torch.Tensor) and weight.requires_grad


def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An FSDP1 `auto_wrap_policy`: own units for decoder layers and for leaves with trainable weights.

    Build it after the adapters are added (trainability decides the leaf units). Pass it as
    `FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), ...)` or as
    accelerate's `FullyShardedDataParallelPlugin(auto_wrap_policy=...)`.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    lambda_policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=_has_trainable_weight)
    layer_policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_layer_classes_to_wrap(model))
    return functools.partial(_or_policy, policies=[lambda_policy, layer_policy])


def shard_peft_model(model: nn.Module, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2: `fully_shard` every decoder layer (and prompt encoder), then the root; returns `model`.

    FSDP2 shards per parameter, so frozen base weights and trainable adapters may share a unit;
    a layer-level unit keeps one all-gather per layer. Extra keyword arguments go to `fully_shard`.
    """
    from torch.distributed.fsdp import fully_shard

    layer_classes = tuple(_layer_classes_to_wrap(model))
    for module in list(_outermost(model, layer_classes)):
        fully_shard(module, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def _outermost(model: nn.Module, classes: tuple[type, ...]) -> Iterator[nn.Module]:
    """Instances of `classes` in `model` that are not inside another such instance."""
    for child in model.children():
        if isinstance(child, classes):
            yield child
        else:
            yield from _outermost(child, classes)


# ---------------------------------------------------------------------------------------- gathering
@contextlib.contextmanager
def _fsdp1_full_params(model: nn.Module) -> Iterator[None]:
    """Unshard every FSDP1 unit of `model` (read-only) for the duration of the block."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with contextlib.ExitStack() as stack:
        for root in FullyShardedDataParallel.fsdp_modules(model, root_only=True):
            stack.enter_context(FullyShardedDataParallel.summon_full_params(root, writeback=False))
        yield


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective), or the tensor itself."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().clone()


def gather_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`adapter_name`'s full tensors under peft's checkpoint keys, on every rank (collective).

    Works for a plain, DDP-, FSDP1- or FSDP2-wrapped peftkit model. Only the adapter's tensors are
    gathered under FSDP2; FSDP1 unshards the model unit by unit (its only read-only gather).
    """
    peft_model = unwrap_peft_model(model)
    if _uses_fsdp1(model):
        with _fsdp1_full_params(model):
            state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
            state = {strip_wrapper_prefixes(key): tensor.detach().clone() for key, tensor in state.items()}
        return state
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {key: _full_tensor(tensor) for key, tensor in state.items()}


def _adapter_names(peft_model: nn.Module, selected: Optional[Iterable[str]]) -> list[str]:
    return list(peft_model.peft_config) if selected is None else list(selected)


def _full_adapter_params_by_name(peft_model: nn.Module, adapter_names: list[str]) -> dict[str, torch.Tensor]:
    """In-model name -> full tensor for every tensor of the given adapters (the FSDP2 gather)."""
    wanted = {id(t) for name in adapter_names for t in adapter_tensor_map(peft_model, name).values()}
    named = peft_model.state_dict(keep_vars=True)
    return {name: _full_tensor(tensor) for name, tensor in named.items() if id(tensor) in wanted}


def save_pretrained_distributed(
    model: nn.Module,
    save_directory: str,
    is_main_process: Optional[bool] = None,
    selected_adapters: Optional[list[str]] = None,
    **kwargs: Any,
) -> None:
    """`save_pretrained` for a DDP/FSDP1/FSDP2-wrapped peftkit model: call on every rank, rank 0 writes.

    `is_main_process` defaults to `rank == 0`; other keyword arguments go to `save_pretrained`.
    """
    peft_model = unwrap_peft_model(model)
    main = _is_main_process() if is_main_process is None else is_main_process
    kwargs = {"selected_adapters": selected_adapters, "is_main_process": main, **kwargs}
    if _uses_fsdp1(model):
        # Inside summon_full_params the original parameters are full views; keys drop FSDP1's segments.
        with _fsdp1_full_params(model):
            peft_model.save_pretrained(save_directory, **kwargs)
    else:
        names = _adapter_names(peft_model, selected_adapters)
        state_dict = _full_adapter_params_by_name(peft_model, names)
        peft_model.save_pretrained(save_directory, state_dict=state_dict, **kwargs)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank reads the folder before rank 0 has written it
