r"""LoHa and LoKr on quantized bases: peftkit's `Linear4bit` / `Linear8bit` and bitsandbytes' layers.

The forward is the method's own, `y = base(x) + delta(x)`: the delta path (factored or
materialised) is built from the adapter factors alone and never needs the base weight. Merging
cannot add to packed codes in place, so it goes through the dense weight and back:

    W_q  <-  quantize(dequantize(W_q) + sum_adapters delta_W)

which rounds (a warning says so, as for LoRA); unmerging subtracts and re-quantizes again. For an
exact dense merge, call `dequantize_model(peft_model)` first and then `merge_and_unload()`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..errors import AdapterStateError
from ..tuners._core.layer import BaseTunerLayer
from ..tuners._lycoris import LYCORIS_DISPATCHERS, LycorisLayer
from ..tuners.loha.layer import LoHaLayer
from ..tuners.lokr.layer import LoKrLayer
from .lora_layers import REQUANTIZE_WARNING, dense_weight, is_quantized_linear, store_dense_weight


class QuantizedLycorisMixin:
    """Merging through dequantize -> add -> re-quantize; put before the method's layer class."""

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W_q <- quantize(dequantize(W_q) + sum delta_W); the method's plain merge if the base is dense."""
        base = self.get_base_layer()
        if not is_quantized_linear(base):
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        warnings.warn(REQUANTIZE_WARNING, stacklevel=2)
        weight = dense_weight(base)
        for name in names:
            merged = weight + self.get_delta_weight(name).detach().to(weight)
            if safe_merge and not torch.isfinite(merged).all():
                raise AdapterStateError(
                    f"Merging adapter {name!r} gives NaN/inf weights; the adapter is broken, so nothing was merged."
                )
            weight = merged
        with torch.no_grad():
            store_dense_weight(base, weight)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """W_q <- quantize(dequantize(W_q) - sum delta_W) (approximate: both steps round)."""
        base = self.get_base_layer()
        if not is_quantized_linear(base) or not self.merged:
            super().unmerge()
            return
        weight = dense_weight(base)
        for name in reversed(self.merged_adapters):
            weight = weight - self.get_delta_weight(name).detach().to(weight)
        with torch.no_grad():
            store_dense_weight(base, weight)
        self.merged_adapters.clear()


class QuantizedLoHaLayer(QuantizedLycorisMixin, LoHaLayer):
    """LoHa over a quantized linear base."""


class QuantizedLoKrLayer(QuantizedLycorisMixin, LoKrLayer):
    """LoKr over a quantized linear base."""


#: The quantized variant of each LyCORIS layer class.
QUANTIZED_LYCORIS_LAYERS: dict[type[LycorisLayer], type[LycorisLayer]] = {
    LoHaLayer: QuantizedLoHaLayer,
    LoKrLayer: QuantizedLoKrLayer,
}


def dispatch_quantized(
    layer_cls: type[LycorisLayer], target: nn.Module, adapter_name: str, **kwargs: Any
) -> Optional[LycorisLayer]:
    """LYCORIS_DISPATCHERS entry: the quantized variant of `layer_cls` for quantized linear bases, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    quantized_cls = QUANTIZED_LYCORIS_LAYERS.get(layer_cls)
    if quantized_cls is None or not is_quantized_linear(base):
        return None
    return quantized_cls(target, adapter_name, **kwargs)


def register() -> None:
    """Add `dispatch_quantized` to the LyCORIS dispatchers (once)."""
    if dispatch_quantized not in LYCORIS_DISPATCHERS:
        LYCORIS_DISPATCHERS.append(dispatch_quantized)
