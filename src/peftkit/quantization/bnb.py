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
    """The bitsandbytes layer's weight as float32 (out, in), decoded from its codes and scales.

    4-bit weights are decoded here by the format's formula (`code[nibble] * absmax[block]`, the
    nested absmax as `code8[q] * absmax2[q // 256] + offset`) with the code tables the layer's
    quant state holds, not by bitsandbytes' CPU kernel: that kernel is wrong for layers with fewer
    than 64 input features on some CPUs. A weight that `Linear4bit`'s first CPU forward repacked
    (AVX512-BF16 machines) is read in that layout.
    """
    weight = layer.weight
    if isinstance(layer, _bnb_nn().Linear4bit):
        return _dequantize_4bit(weight.data, weight.quant_state)
    scale = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * (scale.float().unsqueeze(1) / 127.0)


def _dequantize_4bit(data: torch.Tensor, state: object) -> torch.Tensor:
    rows, columns = state.shape
    flat = data.reshape(-1).view(torch.uint8)
    if getattr(state, "packing_format_for_cpu", False):
        # Repacked layout: per 32 output rows and per pair of columns, 32 low nibbles then 32 high
        # nibbles (row-major inside the group); absmax transposed to (columns / blocksize, rows), bf16.
        groups = flat.view(-1, 32)
        pairs = torch.cat((groups & 0x0F, groups >> 4), dim=1).view(rows // 32, columns // 2, 32, 2)
        indices = pairs.transpose(1, 2).reshape(-1).long()
        absmax = state.absmax.float().T.reshape(-1)
    else:
        indices = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1).long()
        absmax = state.absmax.float()
        if getattr(state, "nested", False):
            nested = state.state2
            absmax = nested.code[state.absmax.long()] * nested.absmax.repeat_interleave(nested.blocksize)[: absmax.numel()]
            absmax = absmax + state.offset
    n = rows * columns
    scales = absmax.repeat_interleave(state.blocksize)[:n]
    return (state.code.float()[indices[:n]] * scales).view(rows, columns)


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the dense `weight` into the bitsandbytes layer with the layer's own settings."""
    bnb_nn = _bnb_nn()
    old = layer.weight
    device = old.device
    if isinstance(layer, bnb_nn.Linear4bit):
        # A weight repacked by a CPU inference forward reports bfloat16; quantize from the original dtype.
        dtype = getattr(old.quant_state, "original_dtype", old.quant_state.dtype)
        new = bnb_nn.Params4bit(
            weight.detach().to("cpu", dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=layer,
        )
        layer.weight = new.to(device)
        return
    new = bnb_nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
    layer.weight = new.to(device)
    layer.state.reset_grads()
    layer.state.CB, layer.state.SCB = layer.weight.CB, layer.weight.SCB
