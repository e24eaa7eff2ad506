"""bitsandbytes' quantized layers seen through peftkit: detection, dequantization, re-quantization.

bitsandbytes is optional: nothing here imports it unless the caller's model already did (a model
holding bitsandbytes layers means the package is loaded), so peftkit never needs it installed.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _bnb_nn():
    return sys.modules.get("bitsandbytes.nn")


def is_bnb_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes `Linear4bit` or `Linear8bitLt`."""
    bnb_nn = _bnb_nn()
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The bitsandbytes layer's weight as float32 (out, in)."""
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if isinstance(layer, _bnb_nn().Linear4bit):
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * (scale.float().unsqueeze(1) / 127.0)


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the dense `weight` into the bitsandbytes layer with the layer's own settings."""
    bnb_nn = _bnb_nn()
    old = layer.weight
    device = old.device
    if isinstance(layer, bnb_nn.Linear4bit):
        new = bnb_nn.Params4bit(
            weight.detach().to("cpu", old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=layer,
        )
        layer.weight = new.to(device)
        return
    new = bnb_nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
    layer.weight = new.to(device)
    layer.state.reset_grads()
    layer.state.CB, layer.state.SCB = layer.weight.CB, layer.weight.SCB
