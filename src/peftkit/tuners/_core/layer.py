"""`BaseTunerLayer`: the bookkeeping every adapter-bearing layer shares.

A tuner layer wraps a frozen `base_layer` and holds each adapter's tensors in per-name
`ModuleDict` / `ParameterDict` attributes (listed in `adapter_layer_names`), so several adapters
coexist and one or more are active. Methods whose update is additive (`W' = W + delta_W`) get
merge / unmerge for free by implementing `get_delta_weight`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import torch
from torch import nn

from ...errors import AdapterStateError


class BaseTunerLayer:
    """Mixin for `nn.Module` layers that wrap a `base_layer` and hold named adapters."""

    #: Attributes that hold each adapter's trainable tensors, keyed by adapter name.
    adapter_layer_names: tuple[str, ...] = ()
    #: Attributes that hold each adapter's settings (rank, scaling, dropout), keyed by adapter name.
    other_param_names: tuple[str, ...] = ()

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

    def adapter_params(self, adapter_names: Optional[Iterable[str]] = None) -> Iterator[nn.Parameter]:
        """The trainable tensors of the given adapters (all adapters when None)."""
        wanted = None if adapter_names is None else set(adapter_names)
        for attr in self.adapter_layer_names:
            for name, item in getattr(self, attr).items():
                if wanted is not None and name not in wanted:
                    continue
                if isinstance(item, nn.Parameter):
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
            if isinstance(item, nn.Parameter):
                state[f"{prefix}.{attr}"] = item
            else:
                for param_name, tensor in item.state_dict(keep_vars=True).items():
                    state[f"{prefix}.{attr}.{param_name}"] = tensor
        return state

    # ------------------------------------------------------------------ switching
    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make `adapter_names` the active adapters; only they require grad."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            for name, item in getattr(self, attr).items():
                item.requires_grad_(name in names)
        self._active_adapter = names

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

    # ------------------------------------------------------------------ merging (additive methods)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W of `adapter_name`, shaped and laid out like the base weight."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base weight.")

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        already = [name for name in names if name in self.merged_adapters]
        if already:
            warnings.warn(f"Adapters {already} are already merged; merging them again is skipped.", stacklevel=3)
        return [name for name in names if name not in self.merged_adapters and name in self.adapter_names()]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each adapter's delta to the base weight: W <- W + delta_W.

        With `safe_merge`, the sum is checked for NaN/inf before the weight is touched.
        """
        weight = self.get_base_layer().weight
        for name in self._adapters_to_merge(adapter_names):
            delta = self.get_delta_weight(name).to(weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise AdapterStateError(
                        f"Merging adapter {name!r} gives NaN/inf weights; the adapter is broken, so nothing was merged."
                    )
                weight.data.copy_(merged)
            else:
                weight.data.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged delta again, newest first: W <- W - delta_W."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data.sub_(self.get_delta_weight(name).to(weight.dtype))

    # ------------------------------------------------------------------ helpers for subclasses
    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """Put `adapter_name`'s tensors on the base weight's device; fp32 unless the base is fp32/fp64.

        Low-precision bases (fp16/bf16/quantized) keep fp32 adapters, as peft's autocast does,
        so small adapter updates are not lost to rounding.
        """
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) or not keep_fp32 else torch.float32
        if not weight.is_floating_point():
            dtype = torch.float32
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    item.data = item.data.to(weight.device, dtype)
                else:
                    item.to(weight.device, dtype)
