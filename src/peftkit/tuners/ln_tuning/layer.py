r"""LN tuning layers: the targeted layer runs as a trained copy of itself.

    y = base(x)                 adapters disabled (or none active here)
    y = copy_a(x)               adapter a active; copy_a = deepcopy(base) at creation, trained in full

Usually the target is a LayerNorm / RMSNorm (a few thousand parameters per model), but any module
works. The copies are saved under `ln_tuning_layers` (`...input_layernorm.ln_tuning_layers.weight`).
"Merging" swaps the copy in as the base layer (no arithmetic); unmerging swaps it back. Only one
adapter can be active or merged at a time.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import AdapterStateError
from .._core.layer import BaseTunerLayer


class LNTuningLayer(BaseTunerLayer, nn.Module):
    """A wrapped module plus, per adapter, a trained copy of it (`ln_tuning_layers[adapter]`)."""

    adapter_layer_names = ("ln_tuning_layers",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, inference_mode: bool = False) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.ln_tuning_layers = nn.ModuleDict({})
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, inference_mode=inference_mode)

    def update_layer(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Add (or replace) adapter `adapter_name`: a copy of the original (unmerged) layer."""
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.original_layer())
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def original_layer(self) -> nn.Module:
        """The layer as it was before any merge (a merged adapter swapped it into `ln_tuning_layers`)."""
        return self.ln_tuning_layers[self.merged_adapters[-1]] if self.merged else self.base_layer

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """No dtype change: the copies keep the layer's own dtype (peft skips autocasting for LN tuning)."""

    # ------------------------------------------------------------------ switching
    def enable_adapters(self, enabled: bool) -> None:
        """As peft: disabling unmerges first."""
        if not enabled and self.merged:
            self.unmerge()
        super().enable_adapters(enabled)

    # ------------------------------------------------------------------ merging: a swap, one adapter at a time
    def _check_merge(self, names: list[str], safe_merge: bool) -> None:
        if len(names) > 1:
            raise AdapterStateError(
                f"Trying to merge {len(names)} adapters, but LN tuning does not allow merging more than one adapter "
                "at a time"
            )

    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        """Swap the copy of `names[0]` in as the base layer (unmerging another merged adapter first)."""
        self._check_merge(names, safe_merge)
        if self.merged:
            warnings.warn(f"Already merged with {set(self.merged_adapters)}. Unmerging first.", stacklevel=3)
            self.unmerge()
        self._swap(names[0])
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        """Swap the original layer back in."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._swap(self.merged_adapters.pop())

    def _unmerge_to(self, keep: int) -> None:
        while len(self.merged_adapters) > keep:
            self.unmerge()

    def _swap(self, adapter_name: str) -> None:
        self.base_layer, self.ln_tuning_layers[adapter_name] = self.ln_tuning_layers[adapter_name], self.base_layer

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise AdapterStateError("LN tuning swaps whole layers when merging; it has no weight delta.")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The active adapter's copy, or the base layer (disabled, merged, or no adapter active here)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active_adapter:
            return self.base_layer(x, *args, **kwargs)
        if len(self._active_adapter) != 1:
            raise AdapterStateError(
                f"Trying to run forward with {len(self._active_adapter)} active adapters, but LN tuning does not "
                "allow inference with more than one adapter at a time"
            )
        name = self._active_adapter[0]
        layer = self.ln_tuning_layers[name] if name in self.ln_tuning_layers else self.base_layer
        return layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "ln_tuning." + super().__repr__()


def in_out_features(base: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """(in, out) sizes of common layers; (None, None) for others such as norms (peft's attributes)."""
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape
        return in_features, out_features
    if isinstance(base, nn.MultiheadAttention):
        return base.embed_dim, 3 * base.embed_dim
    return getattr(base, "in_features", None), getattr(base, "out_features", None)


def dispatch_any(target: nn.Module, adapter_name: str, **kwargs: Any) -> LNTuningLayer:
    """LN tuning wraps any module (its copy is trained in full)."""
    return LNTuningLayer(target, adapter_name, **kwargs)
