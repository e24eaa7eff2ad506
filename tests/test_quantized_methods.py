"""(IA)^3, LoHa, LoKr and AdaLoRA over quantized bases (ours and bitsandbytes'), and saving a 4-bit model."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from peftkit import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, PeftModel, TaskType, get_peft_model
from peftkit.quantization import (
    Linear4bit,
    Linear8bit,
    QuantizationConfig,
    dequantize_model,
    load_quantized_model,
    quantize_model,
    save_quantized_model,
)
from peftkit.tuners.adalora.layer import SVDLinear
from peftkit.tuners.ia3.layer import Linear as IA3Linear
from peftkit.tuners.loha.layer import LoHaLayer
from peftkit.tuners.lokr.layer import LoKrLayer
from tests.bnb_helpers import bnb_forward_disagreement, bnb_llama, bnb_quantize_model, needs_bnb, skip_if_kernel_disagrees
from tests.tiny_models import llama, lm_inputs

ATTENTION = ["q_proj", "v_proj"]
QUANTS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
METHODS = ("ia3", "loha", "lokr", "adalora")
# Each method's own layer class wraps quantized bases: there is no per-format subclass.
LAYER_TYPES = {"ia3": IA3Linear, "loha": LoHaLayer, "lokr": LoKrLayer, "adalora": SVDLinear}
PREFIXES = ("ia3_", "hada_", "lokr_", "lora_")


def method_config(method: str):
    common = {"task_type": TaskType.CAUSAL_LM}
    if method == "ia3":
        # k/v scale outputs, down_proj (feed-forward) scales inputs: both forms are covered.
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], **common)
    if method == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules=ATTENTION, **common)
    if method == "adalora":
        return AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=ATTENTION, **common)
    return LoKrConfig(r=4, alpha=8, target_modules=ATTENTION, **common)


def quantized_llama(quant: str) -> torch.nn.Module:
    return quantize_model(llama(), QuantizationConfig(**QUANTS[quant]))


def randomize_adapters(model: PeftModel, std: float = 0.2) -> None:
    """Non-trivial adapters (a fresh one is a no-op): IA3 vectors near 1, LyCORIS factors N(0, std)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2].startswith(PREFIXES) or any(f".{p}" in name for p in PREFIXES):
                noise = torch.randn(param.shape, generator=generator) * std
                param.copy_(1 + noise if "ia3_" in name else noise)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items() if any(prefix in n for prefix in PREFIXES)}


def first_layer(model: PeftModel):
    """A layer every method's config wraps (v_proj: an attention-type target for IA3)."""
    return model.base_model.model.model.layers[0].self_attn.v_proj


# ---------------------------------------------------------------------------------------------- ours
@pytest.mark.parametrize("quant", sorted(QUANTS))
@pytest.mark.parametrize("method", METHODS)
def test_matches_same_adapter_over_dequantized_base(method, quant):
    inputs = lm_inputs()
    model = get_peft_model(quantized_llama(quant), method_config(method))
    layer = first_layer(model)
    assert type(layer) is LAYER_TYPES[method]
    assert isinstance(layer.get_base_layer(), Linear8bit if quant == "int8" else Linear4bit)
    randomize_adapters(model)
    reference = get_peft_model(dequantize_model(quantized_llama(quant), torch.float32), method_config(method))
    _, unexpected = reference.load_state_dict(adapter_state(model), strict=False)
    assert not unexpected
    with torch.no_grad():
        expected = reference(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        got = model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base_logits, atol=1e-2)  # the adapter does move the logits


@pytest.mark.parametrize("method", METHODS)
def test_training_step_trains_only_adapters_and_lowers_loss(method):
    model = get_peft_model(quantized_llama("nf4"), method_config(method))
    if method != "ia3":
        randomize_adapters(model, std=0.05)  # LyCORIS starts at delta 0 with one zero factor: give all grads
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(prefix in n for prefix in PREFIXES) for n in trainable)
    base = first_layer(model).get_base_layer()
    codes = base.weight.detach().clone()
    inputs = lm_inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.weight, codes) and base.weight.grad is None
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_save_load_roundtrip(method, tmp_path):
    inputs = lm_inputs()
    model = get_peft_model(quantized_llama("nf4"), method_config(method))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_llama("nf4"), tmp_path)
    assert type(first_layer(loaded)) is LAYER_TYPES[method]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("quant", sorted(QUANTS))
@pytest.mark.parametrize("method", METHODS)
def test_merge_requantizes_with_warning_and_stays_close(method, quant):
    inputs = lm_inputs()
    model = get_peft_model(quantized_llama(quant), method_config(method))
    randomize_adapters(model)
    layer = first_layer(model)
    base = layer.get_base_layer()
    before = base.dequantize_weight(torch.float32)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        if method == "ia3":  # v_proj is an attention-type target: rows scaled
            dense_merged = before * layer.ia3_l["default"].detach()
        else:
            dense_merged = before + layer.get_delta_weight("default").detach()
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        assert layer.merged
        expected_codes = type(base).from_linear(_dense(dense_merged), **_settings(base))
        assert torch.equal(layer.get_base_layer().dequantize_weight(torch.float32),
                           expected_codes.dequantize_weight(torch.float32))
        merged = model(**inputs).logits
        model.unmerge_adapter()
        restored = layer.get_base_layer().dequantize_weight(torch.float32)
        # Two roundings (merge, unmerge): about one code gap, far from the weights' size.
        assert (restored - before).abs().mean() < 0.1 * before.abs().mean()
        fresh = get_peft_model(quantized_llama(quant), method_config(method))
        randomize_adapters(fresh)
        with pytest.warns(UserWarning, match="re-quantizes"):
            unloaded = fresh.merge_and_unload()
        after_unload = unloaded(**inputs).logits
    v_proj = unloaded.model.layers[0].self_attn.v_proj
    assert type(v_proj) is (Linear8bit if quant == "int8" else Linear4bit)
    assert torch.equal(after_unload, merged)  # merge_and_unload merges exactly as merge_adapter
    # Re-quantizing adds about one code step of noise per weight: small next to the logits, and for
    # int8 far below the adapter's own effect.
    assert (merged - unmerged).abs().mean() < 0.15 * unmerged.abs().mean()
    if quant == "int8":
        assert (merged - unmerged).abs().mean() < 0.25 * (base_logits - unmerged).abs().mean()


@pytest.mark.parametrize("method", METHODS)
def test_dequantize_then_merge_and_unload_is_exact(method):
    inputs = lm_inputs()
    model = get_peft_model(quantized_llama("nf4"), method_config(method))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no re-quantization warning: the bases are dense now
            dense = dequantize_model(model).merge_and_unload()
        assert type(dense.model.layers[0].self_attn.v_proj) is torch.nn.Linear
        assert torch.allclose(dense(**inputs).logits, expected, atol=1e-4)


def test_ia3_merge_by_hand_scales_weight_and_bias():
    """One quantized Linear with a bias: W_q <- quantize(diag(l) W), b <- l * b (attention form)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(64, 8))
    quantize_model(model, QuantizationConfig(load_in_4bit=True))
    config = IA3Config(target_modules=["proj"], feedforward_modules=[])
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.proj
    vector = torch.linspace(0.5, 1.5, 8).unsqueeze(1)
    layer.ia3_l["default"].data.copy_(vector)
    base = layer.get_base_layer()
    weight, bias = base.dequantize_weight(torch.float32), base.bias.detach().clone()
    expected = Linear4bit.from_linear(_dense(weight * vector)).dequantize_weight(torch.float32)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert torch.equal(base.dequantize_weight(torch.float32), expected)
    assert torch.allclose(base.bias, bias * vector.flatten())
    layer.unmerge()
    assert torch.allclose(base.bias, bias, atol=1e-6)


def _dense(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear


def _settings(base) -> dict:
    if isinstance(base, Linear4bit):
        return {"quant_type": base.quant_type, "double_quant": base.double_quant}
    return {}


# ---------------------------------------------------------------------------------------------- bitsandbytes
@needs_bnb
@pytest.mark.parametrize("four_bit", [True, False], ids=["Linear4bit", "Linear8bitLt"])
@pytest.mark.parametrize("method", METHODS)
def test_over_bitsandbytes_layers_matches_ours(method, four_bit):
    inputs = lm_inputs()
    quant = QuantizationConfig(**QUANTS["nf4" if four_bit else "int8"])
    ours = get_peft_model(quantize_model(bnb_llama(), quant), method_config(method))
    theirs = get_peft_model(bnb_quantize_model(bnb_llama(), four_bit=four_bit), method_config(method))
    assert type(first_layer(theirs)) is LAYER_TYPES[method]
    skip_if_kernel_disagrees(bnb_forward_disagreement(theirs))
    randomize_adapters(ours)
    _, unexpected = theirs.load_state_dict(adapter_state(ours), strict=False)
    assert not unexpected
    ours.train(), theirs.train()  # no dropout; keeps bitsandbytes' CPU weight layout (see bnb_helpers)
    with torch.no_grad():
        expected = ours(**inputs).logits
        got = theirs(**inputs).logits
        if four_bit:  # same codes, same math
            assert torch.equal(got, expected)
        else:  # the bare int8 bases already differ by ~0.05 (bitsandbytes' fp16 round trip of the weight)
            assert torch.allclose(got, expected, atol=0.1)
        with pytest.warns(UserWarning, match="re-quantizes"):
            theirs.merge_adapter()
        assert first_layer(theirs).merged
        merged = theirs(**inputs).logits
        with pytest.warns(UserWarning, match="re-quantizes"):
            ours.merge_adapter()
        # Both re-quantize the same dense W + delta W: the merged models agree far more closely than
        # merged and unmerged do (4-bit: only bitsandbytes' native nested-absmax codes differ, ~0.2%).
        gap = (merged - ours(**inputs).logits).abs().mean()
        assert gap < (0.01 if four_bit else 0.1) * merged.abs().mean()
        if four_bit:
            assert gap < 0.5 * (merged - got).abs().mean()
        theirs.unmerge_adapter()
    loss = theirs(**inputs).loss
    loss.backward()
    grads = [p.grad for n, p in theirs.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


# ---------------------------------------------------------------------------------------------- 4-bit model save / load
@pytest.mark.parametrize("quant", ["nf4", "fp4-single", "int8"])
def test_quantized_model_save_and_reload_is_exact(quant, tmp_path):
    settings = QUANTS.get(quant) or {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                     "bnb_4bit_compute_dtype": torch.bfloat16}
    config = QuantizationConfig(**settings)
    model = quantize_model(llama(), config)
    inputs = lm_inputs()
    save_quantized_model(model, tmp_path)
    # From the class (config.json is read) and from a fresh instance.
    from_class = load_quantized_model(LlamaForCausalLM, str(tmp_path)).eval()
    from_instance = load_quantized_model(llama(), str(tmp_path)).eval()
    # By hand: quantize a fresh model with the same config, then load the plain state dict.
    torch.save(model.state_dict(), tmp_path / "state.pt")
    by_hand = quantize_model(llama(), config)
    by_hand.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    with torch.no_grad():
        expected = model(**inputs).logits
        for reloaded in (from_class, from_instance, by_hand):
            assert reloaded.peftkit_quantization_config == config
            assert type(reloaded.model.layers[1].mlp.down_proj) is type(model.model.layers[1].mlp.down_proj)
            assert torch.equal(reloaded(**inputs).logits, expected)


def test_save_quantized_model_refuses_a_dense_model(tmp_path):
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize_model"):
        save_quantized_model(llama(), tmp_path)
