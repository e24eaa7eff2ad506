"""Facts about the layers adapters wrap, shared by the methods that wrap Linear-like and conv layers."""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import TargetModulesError
from ...quantization.weights import is_quantized


def linear_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a GPT-2 `Conv1D` (whose weight is (in, out))."""
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    return base_layer.in_features, base_layer.out_features


def base_of(target: nn.Module) -> nn.Module:
    """The innermost layer of `target` (itself unless it is a tuner layer wrapping another)."""
    return target.get_base_layer() if hasattr(target, "get_base_layer") else target


def correct_fan_in_fan_out(config: Any, target: nn.Module, is_linear: Optional[Callable[[nn.Module], bool]] = None) -> None:
    """As peft: the base decides the weight layout; a config saying otherwise is corrected in place,
    with peft's warning. Linear (by default `nn.Linear`; `is_linear` widens it) means (out, in),
    GPT-2's `Conv1D` (in, out); any other base leaves the flag as it is."""
    base = base_of(target)
    if isinstance(base, Conv1D):
        if not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=6,
            )
            config.fan_in_fan_out = True
    elif (is_linear(base) if is_linear is not None else isinstance(base, nn.Linear)) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.",
            stacklevel=6,
        )
        config.fan_in_fan_out = False


def wraps(accepts: Union[type, tuple[type, ...], Callable[[nn.Module], bool]], layer_cls: type) -> Callable[..., Any]:
    """A dispatcher (see `BaseTuner.dispatchers`): `layer_cls(target, adapter_name, **kwargs)` when the
    target's innermost layer is an instance of `accepts` (or passes the predicate `accepts`), else None."""
    test = (lambda base: isinstance(base, accepts)) if isinstance(accepts, (type, tuple)) else accepts

    def dispatch(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[nn.Module]:
        return layer_cls(target, adapter_name, **kwargs) if test(base_of(target)) else None

    dispatch.__name__ = dispatch.__qualname__ = f"dispatch_{layer_cls.__name__}"
    return dispatch


def is_linear_like(base: nn.Module) -> bool:
    """`nn.Linear`, GPT-2's `Conv1D`, or a quantized linear layer (peftkit's or bitsandbytes')."""
    return isinstance(base, (nn.Linear, Conv1D)) or is_quantized(base)


def is_transposed(base: nn.Module) -> bool:
    """Whether `base` stores its weight (in, out): transformers' `Conv1D` (peft's `fan_in_fan_out`)."""
    return isinstance(base, Conv1D)


def record_layout(config: Any, layer: nn.Module, key: str) -> None:
    """Make `config.fan_in_fan_out` say how the base of the new `layer` stores its weight, warning if it did not.

    As peft: the layer's layout comes from the base (transposed only for `Conv1D`), and the
    adapter's (private copy of the) config records it.
    """
    found = getattr(layer, "fan_in_fan_out", None)
    if found is None or getattr(config, "fan_in_fan_out", found) == found:
        return
    kind = type(base_of(layer))
    shown = "torch.nn.Linear" if kind is nn.Linear else kind.__name__
    warnings.warn(  # peft's words, so filters written for peft keep working
        f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is `{shown}`. "
        f"Setting fan_in_fan_out to {found}.",
        stacklevel=6,
    )
    config.fan_in_fan_out = found


def refuse_grouped_conv(base_layer: nn.Module, method: str) -> None:
    """Low-rank conv updates assume groups == 1; say so clearly otherwise."""
    if getattr(base_layer, "groups", 1) != 1:
        raise TargetModulesError(
            f"{method} does not support grouped convolutions (groups={base_layer.groups}); "
            "exclude this module via exclude_modules."
        )


def unobserved(*modules: nn.Module) -> bool:
    """No forward hook (own or global) and no patched `forward` on any of `modules`.

    Fused paths call the modules' maths directly instead of the modules, so they are only taken
    when nothing would notice the modules being skipped.
    """
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def is_plain_linear(module: nn.Module) -> bool:
    """A stock `nn.Linear` or transformers `Conv1D` (not a subclass: those may change the maths)."""
    return type(module) in (nn.Linear, Conv1D)


_SWAP_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_SWAP_LOCKS_GUARD = threading.Lock()


def _swap_lock(module: nn.Module) -> threading.RLock:
    """The lock serializing swaps into `module` (one per module, made on first use).

    Kept beside the module, not on it, so that `copy.deepcopy` / pickling of models still work; an
    RLock, because nested wrappers of one module (several `target_parameters`) swap into it in turn.
    """
    with _SWAP_LOCKS_GUARD:
        lock = _SWAP_LOCKS.get(module)
        if lock is None:
            lock = _SWAP_LOCKS[module] = threading.RLock()
        return lock


@contextmanager
def swap_guard(*modules: nn.Module) -> Iterator[None]:
    """Hold the swap locks of `modules` for the block (none under `torch.compile`, see `tensors_swapped`).

    A forward that *reads* a tensor another call may have swapped in (to compute the adapted one from
    the base weight) holds this around the read and its own swap, so it never reads another call's tensor.
    """
    with ExitStack() as stack:
        if not torch.compiler.is_compiling():
            unique = {id(module): module for module in modules}
            for key in sorted(unique):  # one fixed order: no deadlock between calls locking several modules
                stack.enter_context(_swap_lock(unique[key]))
        yield


@contextmanager
def tensors_swapped(swaps: list[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """For the block, `module.<name>` reads the given tensor; the original is put back afterwards.

    Where the attribute lookup finds it: FSDP (`use_orig_params=True`) keeps its unsharded views in
    the instance `__dict__`, shadowing `_parameters` (which is all `torch.func.functional_call` swaps).

    Thread safety: the swap mutates the shared module, so the block holds a lock per swapped module
    (`swap_guard`: a fixed order, re-entrant for nested swaps): concurrent calls of one model run their
    swapped forwards one at a time, and each sees its own tensors. A caller computing the new tensors
    from the current ones holds `swap_guard` around that too. The alternative, computing with
    the adapted weights without touching the module, is not possible in general (target_parameters
    wraps arbitrary modules whose forward reads `self.<param>`). Under `torch.compile` no lock is
    taken: dynamo traces the swap into the graph (the module is not mutated when the graph runs)
    and cannot trace a lock.
    """
    with swap_guard(*(module for module, _, _ in swaps)):
        saved: list[tuple[dict, str, Any]] = []
        try:
            for module, name, tensor in swaps:
                store = next((d for d in (module.__dict__, module._parameters, module._buffers) if name in d), None)
                if store is None:
                    raise AttributeError(f"{type(module).__name__} has no tensor {name!r} to swap.")
                saved.append((store, name, store[name]))
                store[name] = tensor
            yield
        finally:
            for store, name, original in reversed(saved):
                store[name] = original
