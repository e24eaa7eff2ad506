"""bitsandbytes (test-only reference): import guard, its format by formula, and a model quantized with its layers.

bitsandbytes' native CPU kernels are not a trustworthy reference on every CPU: `dequantize_4bit`
is wrong for tensors with fewer than 64 columns on some machines, its native 8-bit blockwise
quantizer picks a neighbouring code for ~0.2% of values (its bucket search; its CUDA and PyTorch
kernels pick the nearest), and `Linear4bit`'s first CPU forward repacks `weight.data` in place on
AVX512-BF16 machines (absmax kept in bfloat16). So the tests compare with bitsandbytes' *codes and
scales*, decode them by the format's formula here, and use a kernel's output only after checking
that it agrees with that formula on the running machine (`kernel_disagreement`).
"""

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


def reference_quantize_blockwise(values: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' own pure-PyTorch 8-bit blockwise quantizer (its "default" kernel, nearest code),
    called past the native CPU kernel that `bnb.functional.quantize_blockwise` dispatches to here."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    code = bnb_functional.create_dynamic_map(signed=True)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, values.float().contiguous(), code, blocksize)


def absmax_by_formula(state) -> torch.Tensor:
    """Per-block absmax of a bitsandbytes 4-bit QuantState: fp32 as stored, or with double quantization
    `code8[q] * absmax2[q // 256] + offset` (code8: the signed dynamic 8-bit map)."""
    if state.state2 is None:
        return state.absmax.float()
    code8 = bnb_functional.create_dynamic_map(signed=True)
    nested = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
    return code8[state.absmax.long()] * nested + state.offset


def dequantize_4bit_by_formula(packed: torch.Tensor, state) -> torch.Tensor:
    """A bitsandbytes 4-bit weight decoded by the format's formula: `code4[nibble] * absmax[block]`,
    high nibble first."""
    code4 = bnb_functional.get_4bit_type(state.quant_type, device="cpu")
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1).long()
    n = state.shape.numel()
    absmax = absmax_by_formula(state).repeat_interleave(state.blocksize)[:n]
    return (code4[nibbles[:n]] * absmax).view(state.shape)


def kernel_disagreement(name: str, got: torch.Tensor, formula: torch.Tensor, atol: float = 0.0) -> str:
    """A skip reason when a bitsandbytes kernel's output differs from the format's formula here ("" if not)."""
    if got.shape == formula.shape and torch.allclose(got.float(), formula.float(), rtol=0.0, atol=atol):
        return ""
    error = float((got.float() - formula.float()).abs().max()) if got.shape == formula.shape else float("nan")
    return (f"bitsandbytes {bnb.__version__}'s CPU {name} kernel disagrees on this machine with the format's "
            f"formula for shape {tuple(formula.shape)} (max error {error:.3g}); it is not a reference here")


def bnb_llama():
    """The tiny Llama at widths bitsandbytes' CPU kernels handle: every Linear has >= 64 inputs and a
    multiple of 32 outputs (below that its `dequantize_4bit` is wrong on some CPUs, and its repacking
    forward asserts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import VOCAB

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def bnb_forward_disagreement(model: nn.Module) -> str:
    """A skip reason when a bitsandbytes Linear4bit of `model` does not compute `x W^T + b` with W
    decoded by the format's formula on this machine (checked on a copy, in training mode: the mode
    the comparisons run in, which keeps the weight in its saved layout)."""
    import copy

    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None:
        return ""
    probe = copy.deepcopy(layer).train()
    weight = dequantize_4bit_by_formula(probe.weight.data, probe.weight.quant_state)
    x = torch.randn(4, probe.in_features, generator=torch.Generator().manual_seed(0))
    expected = x @ weight.T + (probe.bias if probe.bias is not None else 0)
    with torch.no_grad():
        got = probe(x)
    return kernel_disagreement("Linear4bit forward", got, expected, atol=1e-5)


def skip_if_kernel_disagrees(reason: str) -> None:
    if reason:
        pytest.skip(reason)
