"""QLoRA: LoRA over quantized bases (peftkit's Linear4bit/Linear8bit and bitsandbytes' layers)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig

from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peftkit.errors import ConfigError
from peftkit.quantization import Linear4bit, Linear8bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.quantization.weights import is_quantized, read_weight, write_weight
from peftkit.tuners.lora.layer import Linear as LoraLinear
from tests.bnb_helpers import bnb, bnb_forward_disagreement, bnb_llama, bnb_quantize_model, needs_bnb, skip_if_kernel_disagrees
from tests.properties import output_of
from tests.tiny_models import llama, lm_inputs

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def seeds_config(**overrides) -> LoraConfig:
    kwargs = dict(r=16, lora_alpha=32, target_modules=ATTENTION, lora_dropout=0.05, task_type=TaskType.CAUSAL_LM)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def quantized_llama(**config) -> torch.nn.Module:
    config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, **config}
    return quantize_model(llama(), QuantizationConfig(**config))


def is_lora_over_quantized(layer: torch.nn.Module) -> bool:
    """The plain LoRA layer (no per-format subclass) wrapping a quantized base."""
    return type(layer) is LoraLinear and is_quantized(layer.get_base_layer())


def randomize_adapters(model: PeftModel, std: float = 0.2) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)


def test_seeds_qlora_flow_trains_saves_and_loads(tmp_path):
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(quantize_model(llama(), bnb_config))
    model = get_peft_model(model, seeds_config())
    assert is_lora_over_quantized(model.base_model.model.model.layers[0].self_attn.q_proj)
    inputs = lm_inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)

    model.eval()
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 4 * 2  # (A, B) x 4 targets x 2 layers
    with torch.no_grad():
        expected = model(**inputs).logits
        fresh = quantize_model(llama(), bnb_config)
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-4)


def test_saved_qlora_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(quantized_llama(), seeds_config(lora_dropout=0.0))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(llama(), str(tmp_path))
    ours = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, ours[name]), name


def test_parameter_counts_match_peft_on_bitsandbytes_model():
    peft = pytest.importorskip("peft")
    if bnb is None:
        pytest.skip("bitsandbytes (test-only reference) is not usable here")
    ours = get_peft_model(quantized_llama(), seeds_config())
    theirs = peft.get_peft_model(bnb_quantize_model(llama()), peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=ATTENTION, lora_dropout=0.05, task_type="CAUSAL_LM"))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("quant", [{"load_in_4bit": True}, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
                                   {"load_in_8bit": True, "load_in_4bit": False}], ids=["nf4", "fp4", "int8"])
def test_merge_requantizes_and_unmerge(quant):
    model = get_peft_model(quantized_llama(**quant), seeds_config(lora_dropout=0.0))
    randomize_adapters(model, std=0.05)  # a trained-size update: small next to the weights
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    base_type = Linear8bit if quant.get("load_in_8bit") else Linear4bit
    before = base.dequantize_weight(torch.float32)
    delta = layer.get_delta_weight("default").detach()
    expected_merged = type(base).from_linear(_dense(before + delta), **_settings(base)).dequantize_weight(torch.float32)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        assert layer.merged and isinstance(layer.get_base_layer(), base_type)
        assert torch.equal(layer.get_base_layer().dequantize_weight(torch.float32), expected_merged)
        model.unmerge_adapter()
    assert not layer.merged
    restored = layer.get_base_layer().dequantize_weight(torch.float32)
    # Two roundings (merge, unmerge), each at most half a code gap of the merged block's absmax.
    assert (restored - before).abs().max() < 0.5 * (before + delta).abs().max()
    assert (restored - before).abs().mean() < 0.1 * before.abs().mean()


def _dense(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear


def _settings(base) -> dict:
    if isinstance(base, Linear4bit):
        return {"quant_type": base.quant_type, "double_quant": base.double_quant}
    return {}


def test_merge_and_unload_keeps_quantized_base_or_exact_dense():
    inputs = lm_inputs()
    model = get_peft_model(quantized_llama(), seeds_config(lora_dropout=0.0))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded = model.merge_and_unload()
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, Linear4bit)

    model = get_peft_model(quantized_llama(), seeds_config(lora_dropout=0.0))
    randomize_adapters(model)
    dense = dequantize_model(model).merge_and_unload()
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(dense(**inputs).logits, expected, atol=1e-4)


def test_disable_adapter_gives_quantized_base():
    base = quantized_llama()
    inputs = lm_inputs()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(base, seeds_config(lora_dropout=0.0))
    randomize_adapters(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_pissa_refused_on_quantized_base():
    with pytest.raises(ConfigError, match="pissa"):
        get_peft_model(quantized_llama(), seeds_config(init_lora_weights="pissa"))


@pytest.mark.parametrize("quantization", [{}, {"load_in_4bit": False, "load_in_8bit": True}], ids=["nf4", "int8"])
def test_dora_on_quantized_base_equals_dora_on_the_dequantized_base(quantization, tmp_path):
    """QDoRA: same magnitudes, norms and outputs as DoRA over the dequantized weights."""
    from peftkit.quantization import dequantize_model

    config = seeds_config(use_dora=True, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    quantized = get_peft_model(quantized_llama(**quantization), config).eval()
    dense = get_peft_model(dequantize_model(quantized_llama(**quantization)), config).eval()
    dense.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    for name, param in dense.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, dict(quantized.named_parameters())[name]), name
    inputs = {"input_ids": lm_inputs()["input_ids"]}
    expected = output_of(dense, inputs)
    got = output_of(quantized, inputs)
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    quantized.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(quantized_llama(**quantization), str(tmp_path))
    assert torch.allclose(output_of(reloaded, inputs), got, atol=1e-5)
    # Merging: the quantized weight becomes exactly quantize(DoRA-merged dense weight).
    dense.merge_adapter()
    with pytest.warns(UserWarning, match="re-quantizes"):
        quantized.merge_adapter()
    key = "model.layers.0.self_attn.q_proj"
    merged_dense = dense.base_model.model.get_submodule(key).get_base_layer().weight.detach()
    quantized_base = quantized.base_model.model.get_submodule(key).get_base_layer()
    expected_codes = copy.deepcopy(quantized_base)
    with pytest.warns(UserWarning, match="re-quantizes"):
        write_weight(expected_codes, merged_dense)
    assert torch.equal(read_weight(quantized_base), read_weight(expected_codes))


@needs_bnb
@pytest.mark.parametrize("four_bit", [True, False], ids=["Linear4bit", "Linear8bitLt"])
def test_lora_over_bitsandbytes_layers_matches_ours(four_bit):
    inputs = lm_inputs()
    quant = {"load_in_4bit": True, "bnb_4bit_use_double_quant": True} if four_bit else {"load_in_8bit": True}
    ours = get_peft_model(quantize_model(bnb_llama(), QuantizationConfig(**quant)), seeds_config(lora_dropout=0.0))
    theirs = get_peft_model(bnb_quantize_model(bnb_llama(), four_bit=four_bit), seeds_config(lora_dropout=0.0))
    assert is_lora_over_quantized(theirs.base_model.model.model.layers[0].self_attn.q_proj)
    skip_if_kernel_disagrees(bnb_forward_disagreement(theirs))
    randomize_adapters(ours)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ours.train(), theirs.train()  # no dropout; keeps bitsandbytes' CPU weight layout (see bnb_helpers)
    with torch.no_grad():
        expected = ours(**inputs).logits
        got = theirs(**inputs).logits
        # Same codes, same math; int8 differs only in bitsandbytes' fp16 round trip of the weight.
        assert torch.allclose(got, expected, atol=1e-4 if four_bit else 2e-2)
        with pytest.warns(UserWarning, match="re-quantizes"):
            theirs.merge_adapter()
        assert theirs.base_model.model.model.layers[0].self_attn.q_proj.merged
        assert torch.isfinite(theirs(**inputs).logits).all()
        theirs.unmerge_adapter()
    loss = theirs(**inputs).loss
    loss.backward()
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None


def _bnb_linear4bit(out_features: int, in_features: int, double_quant: bool):
    linear = torch.nn.Linear(in_features, out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer).to("cpu")
    layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 32), (96, 128)], ids=["32-inputs", "128-inputs"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_bitsandbytes_4bit_weight_is_decoded_from_its_codes_before_and_after_a_cpu_inference_forward(shape, double_quant):
    from peftkit.quantization.bnb import dequantize
    from tests.bnb_helpers import dequantize_4bit_by_formula

    layer = _bnb_linear4bit(*shape, double_quant)
    before = dequantize(layer)
    # bitsandbytes' own CPU kernel is wrong under 64 inputs on some CPUs; the formula is not.
    assert torch.equal(before, dequantize_4bit_by_formula(layer.weight.data, layer.weight.quant_state))
    if shape[1] < 64:
        return  # bitsandbytes' repacking forward refuses this width
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, shape[1]))  # on AVX512-BF16 CPUs this repacks weight.data in place
    after = dequantize(layer)
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        # Same codes in another layout; absmax now held in bfloat16 (relative rounding <= 2^-8).
        assert torch.allclose(after, before, rtol=2**-8, atol=0)
        assert not torch.equal(layer.weight.data.view(-1)[:64], torch.zeros(64, dtype=torch.uint8))
    else:
        assert torch.equal(after, before)
    lora = get_peft_model(torch.nn.Sequential(layer), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    delta = lora.base_model.model[0].get_delta_weight("default").detach()
    with pytest.warns(UserWarning, match="re-quantizes"):
        lora.merge_adapter()
    merged = dequantize(lora.base_model.model[0].get_base_layer())
    # Re-quantized W + delta W: within one NF4 step of it, not the scrambled bytes of a repacked weight.
    step = (after + delta).abs().reshape(-1, 64).amax(dim=1).repeat_interleave(64).view(shape) * 0.33
    assert ((merged - (after + delta)).abs() <= step).all()
