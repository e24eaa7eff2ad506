"""LoRA on quantized bases: peftkit's `Linear4bit` / `Linear8bit` and bitsandbytes' `Linear4bit` / `Linear8bitLt`.

The forward is plain LoRA (the base layer dequantizes on its own). Merging cannot add in place to
packed codes, so it goes through the dense weight and back:

    W_q  <-  quantize(dequantize(W_q) + sum_adapters scaling * B A)

which rounds: merged outputs differ from unmerged ones by about one quantization step, and
merge -> unmerge does not give back the exact codes (a warning says so). For an exact dense merge,
call `dequantize_model(peft_model)` first and then `merge_and_unload()`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..errors import AdapterStateError, ConfigError
from ..tuners.lora.layer import LORA_DISPATCHERS, Linear as LoraLinear
from . import bnb
from .linear import QuantizedLinearBase

REQUANTIZE_WARNING = (
    "Merging into a quantized base weight dequantizes, adds the adapter and re-quantizes it; rounding makes "
    "the merged model differ slightly from the unmerged one. Call peftkit.quantization.dequantize_model() "
    "first for an exact merge into dense weights."
)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a quantized linear layer LoRA can wrap (peftkit's or bitsandbytes')."""
    return isinstance(module, QuantizedLinearBase) or bnb.is_bnb_linear(module)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The quantized base's weight as float32 (out, in)."""
    if isinstance(base, QuantizedLinearBase):
        return base.dequantize_weight(torch.float32)
    return bnb.dequantize(base)


def store_dense_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the dense `weight` into `base`, replacing its codes."""
    if isinstance(base, QuantizedLinearBase):
        base.requantize_(weight)
    else:
        bnb.requantize(base, weight)


class RequantizingMergeMixin:
    """Additive merging over a quantized base: dequantize -> add delta_W -> re-quantize.

    Put it before the method's layer class (LoRA, LoHa, LoKr); a dense base uses the method's own merge.
    """

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
            merged = weight + self._merge_term(name).to(weight)
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
            weight = weight - self._unmerge_term(name).to(weight)
        with torch.no_grad():
            store_dense_weight(base, weight)
        self.merged_adapters.clear()
        getattr(self, "merge_factors", {}).clear()

    def _merge_term(self, adapter_name: str) -> torch.Tensor:
        """What merging `adapter_name` adds to the dense weight (a plain delta_W by default)."""
        return self.get_delta_weight(adapter_name).detach()

    def _unmerge_term(self, adapter_name: str) -> torch.Tensor:
        """What unmerging `adapter_name` subtracts again."""
        return self.get_delta_weight(adapter_name).detach()


class QuantizedLinear(RequantizingMergeMixin, LoraLinear):
    """LoRA over a quantized linear base; adapters are float32 whatever the compute dtype."""

    def base_weight(self) -> torch.Tensor:
        """The dequantized base weight (DoRA's norms need it; see `LoraLayer.base_weight`)."""
        return dense_weight(self.get_base_layer())

    def _merge_term(self, adapter_name: str) -> torch.Tensor:
        """delta_W, or DoRA's `(f - 1) W0 + f s B A` (recording f for unmerging)."""
        variant = self.lora_variant.get(adapter_name)
        with torch.no_grad():
            factor = variant.merge_factor(self, adapter_name) if variant is not None else None
            if factor is not None:
                self.merge_factors[adapter_name] = factor
            return self._merge_delta(adapter_name, factor).detach()

    def _unmerge_term(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return self._merge_delta(adapter_name, self.merge_factors.get(adapter_name)).detach()

    def _init_from_base_weight(self, adapter_name: str, init_lora_weights: str) -> None:
        raise ConfigError(
            f"init_lora_weights={init_lora_weights!r} rewrites the base weight, which is quantized here; "
            "use init_lora_weights=True or 'gaussian'."
        )

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = dense_weight(self.get_base_layer())
        return x.to(weight.dtype) @ weight.T


def dispatch_quantized(target: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs: Any) -> Optional[nn.Module]:
    """LORA_DISPATCHERS entry: a `QuantizedLinear` for quantized linear bases, else None."""
    if not is_quantized_linear(target):
        return None
    return QuantizedLinear(target, adapter_name, fan_in_fan_out=False, **kwargs)


def register() -> None:
    """Add `dispatch_quantized` to LoRA's dispatchers (once)."""
    if dispatch_quantized not in LORA_DISPATCHERS:
        LORA_DISPATCHERS.append(dispatch_quantized)
