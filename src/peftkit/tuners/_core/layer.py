"""`BaseTunerLayer`: the bookkeeping every adapter-bearing layer shares.

A tuner layer wraps a frozen `base_layer` and holds each adapter's tensors in per-name
`ModuleDict` / `ParameterDict` attributes (listed in `adapter_layer_names`), so several adapters
coexist and one or more are active.

Merging is written once, here, for every method and every base (dense, peftkit-quantized,
bitsandbytes; see `quantization.weights`): a method says what merging one adapter does to the
base's (W, b) -- `get_delta_weight` for additive updates (`W' = W + delta_W`), or `fold` /
`unfold` for multiplicative ones ((IA)^3, DoRA) -- and `merge` / `unmerge` do the rest.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import AdapterStateError
from ...quantization.weights import read_bias, read_weight, write_weight


class BaseTunerLayer:
    """Mixin for `nn.Module` layers that wrap a `base_layer` and hold named adapters."""

    #: Attributes that hold each adapter's trainable tensors, keyed by adapter name.
    adapter_layer_names: tuple[str, ...] = ()
    #: Attributes that hold each adapter's settings (rank, scaling, dropout), keyed by adapter name.
    other_param_names: tuple[str, ...] = ()
    #: Whether loading may find none of this layer's keys in a checkpoint (layers that only view
    #: tensors held elsewhere, e.g. LoRA's `TiedLinear`).
    optional_in_checkpoints: bool = False
    #: Whether `get_delta_weight` is a fixed additive update W' = W + delta_W, which `convert_to_lora`
    #: can approximate by plain LoRA factors (methods whose update depends on W leave it False).
    lora_convertible: bool = False

    base_layer: nn.Module
    _active_adapter: list[str]
    _disable_adapters: bool
    merged_adapters: list[str]

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []

    # ------------------------------------------------------------------ state
    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped layer (tuner layers can be nested, e.g. over a quantized layer)."""
        base = self.base_layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in insertion order."""
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter name any of this layer's per-adapter containers holds (peft's name for it)."""
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if hasattr(container, "keys"):
                names.update(dict.fromkeys(container.keys()))
        return list(names)

    def adapter_params(self, adapter_names: Optional[Iterable[str]] = None) -> Iterator[nn.Parameter]:
        """The trainable tensors of the given adapters (all adapters when None)."""
        wanted = None if adapter_names is None else set(adapter_names)
        for attr in self.adapter_layer_names:
            for name, item in getattr(self, attr).items():
                if wanted is not None and name not in wanted:
                    continue
                if isinstance(item, torch.Tensor):  # a ParameterDict entry (a plain Tensor under FSDP's use_orig_params)
                    yield item
                else:
                    yield from item.parameters()

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint keys (adapter name removed, as in peft files) -> live tensors of one adapter."""
        state: dict[str, torch.Tensor] = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                state[f"{prefix}.{attr}"] = item
            else:
                for param_name, tensor in item.state_dict(keep_vars=True).items():
                    state[f"{prefix}.{attr}.{param_name}"] = tensor
        return state

    # ------------------------------------------------------------------ switching
    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active adapters; only they require grad (none with `inference_mode`)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            for name, item in getattr(self, attr).items():
                item.requires_grad_(name in names and not inference_mode and not self.is_frozen(attr, name))
        self._active_adapter = names

    def is_frozen(self, attr: str, adapter_name: str) -> bool:
        """Whether `attr[adapter_name]` stays frozen when its adapter trains (e.g. MiCA's B); see `frozen_factors`."""
        return attr in getattr(self, "frozen_factors", {}).get(adapter_name, ())

    def trainable_adapter_params(self, adapter_names: Iterable[str]) -> Iterator[nn.Parameter]:
        """`adapter_params` less the tensors that stay frozen (`is_frozen`): what training updates."""
        for attr in self.adapter_layer_names:
            for name, item in getattr(self, attr).items():
                if name in adapter_names and not self.is_frozen(attr, name):
                    yield from [item] if isinstance(item, torch.Tensor) else item.parameters()

    def enable_adapters(self, enabled: bool) -> None:
        """Turn every adapter of this layer on (the active ones train) or off (the base output)."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for param in self.adapter_params():
                param.requires_grad_(False)
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop every tensor and setting of `adapter_name`; re-point the active adapters if needed."""
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [name for name in self._active_adapter if name != adapter_name]
            if not remaining and self.adapter_names():
                remaining = [self.adapter_names()[0]]
            self._active_adapter = remaining

    # ------------------------------------------------------------------ forward (additive methods)
    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`delta_a(x)`, what adapter `adapter_name` adds to the base output (additive methods)."""
        raise NotImplementedError(f"{type(self).__name__} defines its own forward.")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The default forward of additive methods (layers that put this class before `nn.Module`):

            y = base(x) + sum over active adapters a of delta_a(x)

        The base alone when adapters are disabled (a merged adapter is unmerged first) or merged;
        active adapters this layer does not hold are skipped; the result has x's dtype.
        """
        previous_dtype = x.dtype
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        held = self.adapter_names()
        for adapter_name in self.active_adapters:
            if adapter_name in held:
                result = result + self.delta_output(x, adapter_name)
        return result.to(previous_dtype)

    # ------------------------------------------------------------------ merging (every method)
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether `convert_to_lora` can turn this layer's adapter into LoRA factors: an additive
        update (`lora_convertible`) on a linear base, as peft allows."""
        from .base_layers import is_linear_like

        return self.lora_convertible and is_linear_like(self.get_base_layer())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W of `adapter_name`, shaped and laid out like the base weight (additive methods)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base weight.")

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base (W, b) with `adapter_name` merged in: W + delta_W for additive methods.

        Multiplicative methods ((IA)^3, DoRA) override this and `unfold`. `weight` is dense (see
        `quantization.weights`) and must not be modified in place: return new tensors.
        """
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Undo `fold`: W - delta_W for additive methods."""
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype), bias

    def _forget_merge(self, adapter_name: str) -> None:
        """Hook: drop what `fold` remembered for unfolding `adapter_name` (e.g. DoRA's factor)."""

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        """The adapters `merge` folds in: those named (default: the active ones) not merged yet.

        As peft, on a layer with merged adapters: "All adapters are already merged, nothing to do."
        when none is left, else a warning naming the merged and the additional ones.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if self.merged:
            names = [name for name in names if name not in self.merged_adapters]
            if names:
                warnings.warn(
                    f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                    f"You are now additionally merging {','.join(names)}.",
                    stacklevel=3,
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
        return [name for name in names if name in self.adapter_names()]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold each adapter into the base layer, (W, b) <- fold(W, b), then store it once.

        `fold` sees the adapters merged before it in `merged_adapters`. With `safe_merge` every
        intermediate result is checked for NaN/inf; if any check or fold fails, the layer is left
        exactly as it was.
        """
        names = self._adapters_to_merge(adapter_names)
        if names:
            self._merge_names(names, safe_merge)

    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        """`merge` of exactly `names` (checked, none merged yet): all of them or, on failure, none."""
        done = len(self.merged_adapters)
        try:
            with torch.no_grad():
                self._write_base(*self._folded(names, safe_merge))
        except BaseException:
            self._drop_merged_after(done)
            raise

    def _check_merge(self, names: list[str], safe_merge: bool) -> None:
        """Raise what `_merge_names(names, safe_merge)` would raise, writing nothing.

        `merging.merge_layers` calls it on every layer before merging any, so that a failing merge (a NaN/inf
        under `safe_merge`, a layer that cannot merge) leaves every layer unmerged. The folds are
        computed and dropped: `fold` returns new tensors and `_forget_merge` clears what it kept.
        """
        done = len(self.merged_adapters)
        try:
            with torch.no_grad():
                self._folded(names, safe_merge)
        finally:
            self._drop_merged_after(done)

    def _folded(self, names: list[str], safe_merge: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W, b) with `names` folded in, in turn; each is appended to `merged_adapters` as it folds
        (the next `fold` sees it merged). With `safe_merge` every intermediate result must be finite."""
        weight, bias = self._read_base()
        for name in names:
            weight, bias = self.fold(name, weight, bias)
            if safe_merge:
                _require_finite(name, weight, bias)
            self.merged_adapters.append(name)
        return weight, bias

    def _drop_merged_after(self, done: int) -> None:
        """Forget the merges recorded after the first `done` (they were never written, or are undone)."""
        for name in self.merged_adapters[done:]:
            self._forget_merge(name)
        del self.merged_adapters[done:]

    def unmerge(self) -> None:
        """Unfold every merged adapter again, newest first, then store the base weight once."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._unmerge_to(0)

    def _unmerge_to(self, keep: int) -> None:
        """Unfold the merged adapters after the first `keep`, newest first (all or, on failure, none)."""
        weight, bias = self._read_base()
        merged = list(self.merged_adapters)
        try:
            with torch.no_grad():
                while len(self.merged_adapters) > keep:  # `unfold` sees the adapters still merged under it
                    weight, bias = self.unfold(self.merged_adapters[-1], weight, bias)
                    self.merged_adapters.pop()
            self._write_base(weight, bias)
        except BaseException:
            self.merged_adapters[:] = merged
            raise
        for name in merged[keep:]:
            self._forget_merge(name)

    def _read_base(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (W, b) that merging folds adapters into: the base layer's weight and bias, dense."""
        base = self.get_base_layer()
        return read_weight(base), read_bias(base)

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Store what `_read_base` gave, changed (see `quantization.weights.write_weight`)."""
        write_weight(self.get_base_layer(), weight, bias)

    def unwrapped(self) -> nn.Module:
        """The module that replaces this layer when it is unloaded: the wrapped base layer."""
        return self.base_layer

    # ------------------------------------------------------------------ helpers for subclasses
    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """Put `adapter_name`'s tensors on the base weight's device, in the adapter dtype.

        `keep_fp32` (peft's `autocast_adapter_dtype`): over low-precision bases (fp16/bf16/fp8)
        adapters stay fp32, so small updates are not lost to rounding; without it they take the
        base dtype. Quantized bases (integer storage) give fp32, or without `keep_fp32` their float
        `compute_dtype`. Meta tensors (low_cpu_mem_usage=True) stay on the meta device, dtype set.
        As in peft, fresh fp32 tensors over a low-precision float base pass through the base dtype
        first (bf16 -> fp32), so the same seed gives the same adapter in both libraries.
        """
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next((t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()), None)
            if weight is None:
                return
        if not weight.is_floating_point():
            compute = getattr(base, "compute_dtype", None)
            usable = isinstance(compute, torch.dtype) and compute.is_floating_point
            dtype = compute if usable and not keep_fp32 else torch.float32
        elif keep_fp32 and weight.dtype not in (torch.float32, torch.float64):
            dtype = torch.float32
        else:
            dtype = weight.dtype
        rounding = weight.dtype if weight.is_floating_point() and weight.dtype != dtype else None
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            for tensor in [item] if isinstance(item, torch.Tensor) else [*item.parameters(), *item.buffers()]:
                device = tensor.device if tensor.is_meta else weight.device
                if not tensor.is_floating_point():
                    tensor.data = tensor.data.to(device)
                    continue
                data = tensor.data.to(device, rounding) if rounding is not None else tensor.data
                tensor.data = data.to(device, dtype)


def _require_finite(adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """The one NaN/inf check of merging (`safe_merge=True`)."""
    if not all(t is None or bool(torch.isfinite(t).all()) for t in (weight, bias)):
        raise AdapterStateError(
            f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: "
            f"merging {adapter_name!r} gives NaN/inf weights, so nothing was merged."
        )
