"""bitsandbytes (test-only reference): import guard and a model quantized with its layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    torch.ops.bitsandbytes.quantize_4bit  # noqa: B018  (the CPU op must be registered)
    BNB_SKIP_REASON = ""
except Exception as error:  # noqa: BLE001 - any import or backend failure means "no reference here"
    bnb = bnb_functional = None
    BNB_SKIP_REASON = f"bitsandbytes (test-only reference) is not usable here: {error}"

needs_bnb = pytest.mark.skipif(bnb is None, reason=BNB_SKIP_REASON or "bitsandbytes missing")


def bnb_quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                       four_bit: bool = True, skip: tuple = ("lm_head",)) -> nn.Module:
    """Replace the model's nn.Linear layers by bitsandbytes Linear4bit / Linear8bitLt on CPU."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        if four_bit:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.float32, quant_type=quant_type,
                                      compress_statistics=double_quant, device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=double_quant, module=layer).to("cpu")
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, device="meta")
            layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                             has_fp16_weights=False).to("cpu")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, layer)
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = four_bit, not four_bit
    return model
