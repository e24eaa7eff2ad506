"""peftkit.quantization: codes against bitsandbytes, quantized linears, quantize_model, k-bit prep."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from peftkit.errors import ConfigError
from peftkit.quantization import (
    Linear4bit,
    Linear8bit,
    QuantizationConfig,
    dequantize_4bit,
    prepare_model_for_kbit_training,
    quantize_4bit,
    quantize_model,
)
from peftkit.quantization.formats import (
    NF4_CODE,
    dequantize_int8_rowwise,
    dynamic_code,
    quantize_blockwise_8bit,
    quantize_int8_rowwise,
)
from peftkit.quantization.formats import QuantState4bit
from tests.bnb_helpers import (
    bnb_functional,
    dequantize_4bit_by_formula,
    kernel_disagreement,
    needs_bnb,
    reference_quantize_blockwise,
)
from tests.tiny_models import llama, lm_inputs

# Under 64 columns (bitsandbytes' CPU dequantize is wrong there on some machines); an odd element
# count; 512 blocks both ways (nested absmax over two 256-blocks); 1M elements (16384 blocks).
SHAPES = [(64, 32), (33, 7), (5, 300), (256, 128), (128, 256), (1024, 1024)]


# ------------------------------------------------------------------ formats vs bitsandbytes
@needs_bnb
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_4bit_codes_and_scales_match_bitsandbytes(shape, quant_type, double_quant):
    weight = torch.randn(shape) * 0.3
    packed, state = quantize_4bit(weight, quant_type, double_quant=double_quant)
    ref_packed, ref_state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    if not double_quant:
        assert torch.equal(state.absmax, ref_state.absmax)
    else:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
        # The 8-bit codes of absmax - offset: equal to bitsandbytes' PyTorch (and CUDA) quantizer for any
        # size; its native CPU kernel picks a farther code for ~0.2% of values, never a nearer one.
        reference_codes, _ = reference_quantize_blockwise(absmax_of(weight) - ref_state.offset)
        assert torch.equal(state.absmax, reference_codes)
        _assert_codes_are_nearest(weight, state, ref_state)
    # Our decoder on bitsandbytes' own codes and scales gives the format's formula, exactly.
    theirs = QuantState4bit(shape=weight.shape, quant_type=quant_type, blocksize=64, absmax=ref_state.absmax,
                            offset=ref_state.offset if double_quant else None,
                            nested_absmax=ref_state.state2.absmax if double_quant else None)
    assert torch.equal(dequantize_4bit(ref_packed, theirs), dequantize_4bit_by_formula(ref_packed, ref_state))


def absmax_of(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax of each 64-block of the flattened weight (the last block zero-padded)."""
    flat = weight.reshape(-1).float()
    return torch.nn.functional.pad(flat, (0, -flat.numel() % 64)).view(-1, 64).abs().amax(dim=1)


def _assert_codes_are_nearest(weight, state, ref_state) -> None:
    """Our 8-bit absmax codes are the nearest codes; the native kernel's are rarely farther, never nearer."""
    code8 = dynamic_code()
    target = (absmax_of(weight) - state.offset) / state.nested_absmax.repeat_interleave(256)[: state.absmax.numel()]
    ours = (code8[state.absmax.long()] - target).abs()
    theirs = (code8[ref_state.absmax.long()] - target).abs()
    assert (ours <= theirs).all()
    assert (state.absmax != ref_state.absmax).float().mean() < 0.01


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_bitsandbytes_dequantize_kernel_equals_ours_where_it_follows_the_formula(shape, double_quant):
    weight = torch.randn(shape) * 0.3
    ref_packed, ref_state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = QuantState4bit(shape=weight.shape, quant_type="nf4", blocksize=64, absmax=ref_state.absmax,
                            offset=ref_state.offset if double_quant else None,
                            nested_absmax=ref_state.state2.absmax if double_quant else None)
    kernel = bnb_functional.dequantize_4bit(ref_packed, ref_state)
    formula = dequantize_4bit_by_formula(ref_packed, ref_state)
    # The nested absmax is decoded by the kernel in fp32 (not bit-exact with the formula's order of operations).
    reason = kernel_disagreement("dequantize_4bit", kernel, formula, atol=1e-6 if double_quant else 0.0)
    if reason:
        pytest.skip(reason)
    assert torch.allclose(dequantize_4bit(ref_packed, theirs), kernel, rtol=0, atol=1e-6 if double_quant else 0.0)


@needs_bnb
def test_code_tables_match_bitsandbytes():
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(torch.tensor(NF4_CODE), bnb_functional.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize("size", [4096, 1 << 20, 1000])
def test_8bit_blockwise_matches_bitsandbytes_reference(size):
    values = torch.randn(size)
    codes, absmax = quantize_blockwise_8bit(values, blocksize=256)
    ref_codes, ref_absmax = reference_quantize_blockwise(values, 256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    # The native CPU kernel: same absmax, and where its code differs it is a neighbour, never nearer.
    native_codes, native_state = bnb_functional.quantize_blockwise(values, blocksize=256)
    assert torch.equal(absmax, native_state.absmax)
    scaled = values / absmax.repeat_interleave(256)[:size]
    code8 = dynamic_code()
    assert ((code8[codes.long()] - scaled).abs() <= (code8[native_codes.long()] - scaled).abs()).all()
    assert (codes != native_codes).float().mean() < 0.01


@needs_bnb
def test_int8_rowwise_matches_bitsandbytes():
    weight = torch.randn(6, 40)
    int8, row_absmax = quantize_int8_rowwise(weight)
    ref_int8, ref_scale, _ = bnb_functional.int8_vectorwise_quant(weight.clone())
    assert torch.equal(int8, ref_int8) and torch.allclose(row_absmax, ref_scale)


def test_nf4_packing_and_roundtrip_by_hand():
    # One block: absmax 2.0 -> w / 2 = [1, -1, 0, ~0.16]; codes 15, 0, 7, 9 -> bytes 0xF0, 0x79.
    weight = torch.tensor([[2.0, -2.0, 0.0, 0.33]])
    packed, state = quantize_4bit(weight, "nf4")
    assert packed.view(-1).tolist() == [0xF0, 0x79]
    assert state.absmax.tolist() == [2.0]
    restored = dequantize_4bit(packed, state)
    assert torch.allclose(restored, torch.tensor([[2.0, -2.0, 0.0, 2 * NF4_CODE[9]]]))


def test_double_quant_keeps_absmax_close_and_error_small():
    weight = torch.randn(128, 256) * 0.05
    plain = dequantize_4bit(*quantize_4bit(weight, "nf4"))
    double = dequantize_4bit(*quantize_4bit(weight, "nf4", double_quant=True))
    relative_error = (plain - weight).norm() / weight.norm()
    assert relative_error < 0.12  # NF4 on Gaussian weights: ~0.09
    assert (double - plain).norm() / plain.norm() < 0.01


def test_int8_roundtrip_error():
    weight = torch.randn(16, 64)
    restored = dequantize_int8_rowwise(*quantize_int8_rowwise(weight))
    assert ((restored - weight).abs() <= weight.abs().amax(dim=1, keepdim=True) / 254 + 1e-6).all()


# ------------------------------------------------------------------ quantized linear layers
def _reference_linear(in_features: int = 48, out_features: int = 20) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("make", [
    lambda lin: Linear4bit.from_linear(lin, quant_type="nf4", double_quant=True),
    lambda lin: Linear4bit.from_linear(lin, quant_type="fp4"),
    lambda lin: Linear8bit.from_linear(lin),
], ids=["nf4-dq", "fp4", "int8"])
def test_quantized_linear_forward_backward(make):
    linear = _reference_linear()
    layer = make(linear)
    weight = layer.dequantize_weight()
    assert (weight - linear.weight).abs().max() < 0.25 * linear.weight.abs().max()
    x = torch.randn(3, 5, 48, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, x @ weight.T + linear.bias, atol=1e-5)
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ weight.T + linear.bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_autograd_does_not_save_dequantized_weight():
    layer = Linear4bit.from_linear(_reference_linear(64, 64), double_quant=True)
    saved_sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_sizes.append(tensor.numel())
        return tensor

    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    out.sum().backward()
    assert 64 * 64 not in saved_sizes


def test_compute_dtype_bfloat16():
    layer = Linear4bit.from_linear(_reference_linear(), compute_dtype="bfloat16")
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert layer.dequantize_weight().dtype == torch.bfloat16


def test_packed_weight_counts_twice():
    layer = Linear4bit.from_linear(_reference_linear(64, 32))
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 64 * 32 // 2
    assert layer.weight.peftkit_numel_factor == 2


# ------------------------------------------------------------------ quantize_model and configs
def test_quantize_model_skips_head_and_excluded_and_accepts_bnb_config():
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["down_proj"])
    model = quantize_model(llama(), config)
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.double_quant and q_proj.compute_dtype == torch.bfloat16
    assert model.is_loaded_in_4bit
    assert torch.isfinite(model(**lm_inputs()).loss)


def test_quantize_model_8bit_and_output_close():
    reference = llama()
    inputs = lm_inputs()
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = quantize_model(llama(), QuantizationConfig(load_in_8bit=True))(**inputs).logits
    assert isinstance(quantize_model(llama(), {"load_in_8bit": True}).model.layers[0].mlp.up_proj, Linear8bit)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_nf4_double_quant_bytes_under_015_of_fp32():
    dense = llama()
    linear_bytes = sum(m.weight.numel() * 4 for n, m in dense.named_modules() if type(m) is nn.Linear and n != "lm_head")
    model = quantize_model(llama(), QuantizationConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    quantized_bytes = sum(
        sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t is not m.bias)
        for m in model.modules() if isinstance(m, Linear4bit)
    )
    assert quantized_bytes <= 0.15 * linear_bytes


def test_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        QuantizationConfig()
    with pytest.raises(ConfigError, match="nf4"):
        QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")


def test_prepare_model_for_kbit_training():
    model = llama().to(torch.bfloat16)
    model = quantize_model(model, QuantizationConfig(load_in_4bit=True))
    model = prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert model.is_gradient_checkpointing
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeds.requires_grad
