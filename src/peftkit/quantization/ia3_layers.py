r"""(IA)^3 on quantized bases: peftkit's `Linear4bit` / `Linear8bit` and bitsandbytes' `Linear4bit` / `Linear8bitLt`.

The forward is plain (IA)^3 (the base layer dequantizes on its own):

    attention-type target:     y = l * base(x)
    feed-forward target:       y = base(l * x)

Merging cannot scale packed codes in place, so it goes through the dense weight and back:

    attention:      W_q <- quantize(diag(l) dequantize(W_q)),  b <- l * b
    feed-forward:   W_q <- quantize(dequantize(W_q) diag(l))

which rounds (a warning says so, as for LoRA); unmerging divides and re-quantizes again. For an exact
dense merge, call `dequantize_model(peft_model)` first and then `merge_and_unload()`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..errors import AdapterStateError
from ..tuners._core.layer import BaseTunerLayer
from ..tuners.ia3.layer import IA3_DISPATCHERS, Linear as IA3Linear, _nonzero
from .lora_layers import REQUANTIZE_WARNING, dense_weight, is_quantized_linear, store_dense_weight


class QuantizedIA3Linear(IA3Linear):
    """(IA)^3 over a quantized linear base; the vectors are float32 whatever the compute dtype."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.fan_in_fan_out = False  # quantized layers keep W as (out, in)
        self.in_features, self.out_features = base.in_features, base.out_features

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W_q <- quantize(dequantize(W_q) * l) (b <- l * b for attention targets); plain merge if dense."""
        base = self.get_base_layer()
        if not is_quantized_linear(base):
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        warnings.warn(REQUANTIZE_WARNING, stacklevel=2)
        weight, bias = dense_weight(base), None if base.bias is None else base.bias.data
        for name in names:
            factor = self._weight_factor(name).detach().float()
            merged = weight * factor
            merged_bias = bias if self.is_feedforward or bias is None else bias * factor.reshape(bias.shape).to(bias)
            if safe_merge and not all(t is None or torch.isfinite(t).all() for t in (merged, merged_bias)):
                raise AdapterStateError(
                    f"Merging adapter {name!r} gives NaN/inf weights; the adapter is broken, so nothing was merged."
                )
            weight, bias = merged, merged_bias
        with torch.no_grad():
            store_dense_weight(base, weight)
            if bias is not None:
                base.bias.data = bias
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """W_q <- quantize(dequantize(W_q) / l), newest first (approximate: both steps round)."""
        base = self.get_base_layer()
        if not is_quantized_linear(base) or not self.merged:
            super().unmerge()
            return
        weight = dense_weight(base)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            factor = self._weight_factor(name).detach().float()
            if (factor == 0).any():
                warnings.warn(
                    f"Adapter {name!r} has zero entries; the weights they zeroed cannot be restored by unmerging.",
                    stacklevel=2,
                )
            weight = weight / _nonzero(factor)
            bias = self._scaled_bias(name, inverse=True)
            if bias is not None:
                base.bias.data = bias.to(base.bias.dtype)
        with torch.no_grad():
            store_dense_weight(base, weight)


def dispatch_quantized(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[QuantizedIA3Linear]:
    """IA3_DISPATCHERS entry: a `QuantizedIA3Linear` for quantized linear bases, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_quantized_linear(base):
        return None
    return QuantizedIA3Linear(target, adapter_name, **kwargs)


def register() -> None:
    """Add `dispatch_quantized` to (IA)^3's dispatchers (once)."""
    if dispatch_quantized not in IA3_DISPATCHERS:
        IA3_DISPATCHERS.append(dispatch_quantized)
