r"""LoHa and LoKr on quantized bases: peftkit's `Linear4bit` / `Linear8bit` and bitsandbytes' layers.

The forward is the method's own, `y = base(x) + delta(x)`: the delta path (factored or
materialised) is built from the adapter factors alone and never needs the base weight. Merging
cannot add to packed codes in place, so it goes through the dense weight and back:

    W_q  <-  quantize(dequantize(W_q) + sum_adapters delta_W)

which rounds (a warning says so, as for LoRA); unmerging subtracts and re-quantizes again. For an
exact dense merge, call `dequantize_model(peft_model)` first and then `merge_and_unload()`.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..tuners._core.layer import BaseTunerLayer
from ..tuners._lycoris import LYCORIS_DISPATCHERS, LycorisLayer
from ..tuners.loha.layer import LoHaLayer
from ..tuners.lokr.layer import LoKrLayer
from .lora_layers import RequantizingMergeMixin, is_quantized_linear


class QuantizedLoHaLayer(RequantizingMergeMixin, LoHaLayer):
    """LoHa over a quantized linear base."""


class QuantizedLoKrLayer(RequantizingMergeMixin, LoKrLayer):
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
