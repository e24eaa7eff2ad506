"""LoftQ: `init_lora_weights="loftq"` and `replace_lora_weights_loftq`, checked against the method's
formula (bitsandbytes' NF4 codes decoded by formula, a truncated SVD by hand), the error it must
lower, peft's config behaviour, and save -> load on the quantized-value base."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from peftkit import ConfigError, LoftQConfig, LoraConfig, PeftModel, get_peft_model, replace_lora_weights_loftq
from peftkit.quantization import QuantizationConfig, quantize_model
from tests.bnb_helpers import bnb_functional, dequantize_4bit_by_formula, needs_bnb
from tests.interop_helpers import base_copy
from tests.tiny_models import llama

pytestmark = pytest.mark.filterwarnings(r"ignore:Merging into a quantized base")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(128, 64)
        self.lin1 = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def loftq_model(bits: int = 4, iters: int = 1, r: int = 8, **overrides) -> tuple[nn.Module, nn.Module]:
    base = MLP()
    reference = MLP()
    kwargs = dict(r=r, lora_alpha=r, target_modules=["lin0", "lin1"], init_lora_weights="loftq",
                  loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    kwargs.update(overrides)
    return get_peft_model(base, LoraConfig(**kwargs)), reference


def truncated_svd(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def int8_rowwise_by_formula(weight: torch.Tensor) -> torch.Tensor:
    absmax = weight.abs().amax(dim=1, keepdim=True)
    return torch.round(weight * 127 / absmax) * absmax / 127


# ---------------------------------------------------------------------------------------------- config
def test_loftq_config_fields_and_lora_validation_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(LoftQConfig)}
    assert ours == {f.name: f.default for f in dataclasses.fields(peft.LoftQConfig)}
    config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=2))
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}  # saved as the dict, as peft does
    with pytest.raises(ValueError, match="`loftq_config` must be specified"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.warns(UserWarning, match="will be ignored when `init_lora_weights` is not 'loftq'"):
        ignored = LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    assert ignored.loftq_config == {}
    with pytest.raises(ConfigError, match="loftq_bits=3"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3, "loftq_iter": 1})
    with pytest.raises(ConfigError, match="loftq_iter=0"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0})


# --------------------------------------------------------------------------------------------- formula
@needs_bnb
def test_one_iteration_is_bitsandbytes_nf4_plus_the_svd_of_its_error():
    """peft's LoftQ on a GPU: Q from bitsandbytes' NF4 (blocks of 64, fp32 absmax), B A the rank-r SVD of W - Q."""
    model, reference = loftq_model()
    for name in ("lin0", "lin1"):
        weight = getattr(reference, name).weight.detach()
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
        expected_q = dequantize_4bit_by_formula(packed, state)
        layer = getattr(model.base_model.model, name)
        torch.testing.assert_close(layer.base_layer.weight.detach(), expected_q, atol=1e-6, rtol=0)
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(delta.detach(), truncated_svd(weight - expected_q, 8), atol=1e-5, rtol=0)
        assert not torch.equal(expected_q, weight)


def test_int8_and_more_iterations_follow_the_alternation():
    """8 bits: Q is the row-wise int8 round trip; each further step quantizes W minus the previous fit."""
    model, reference = loftq_model(bits=8, iters=2)
    weight = reference.lin0.weight.detach()
    first_q = int8_rowwise_by_formula(weight)
    first_fit = truncated_svd(weight - first_q, 8)
    second_q = int8_rowwise_by_formula(weight - first_fit)
    layer = model.base_model.model.lin0
    torch.testing.assert_close(layer.base_layer.weight.detach(), second_q, atol=1e-6, rtol=0)
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    torch.testing.assert_close(delta, truncated_svd(weight - second_q, 8), atol=1e-5, rtol=0)


def test_the_adapter_lowers_the_quantization_error_and_more_iterations_lower_it_further():
    errors = []
    for iters in (1, 4):
        model, reference = loftq_model(iters=iters)
        layer = model.base_model.model.lin0
        weight = reference.lin0.weight.detach()
        quant_error = (weight - layer.base_layer.weight).norm()
        with torch.no_grad():
            total = weight - layer.base_layer.weight - layer.scaling["default"] * layer.get_delta_weight("default")
        assert total.norm() < 0.9 * quant_error
        errors.append(total.norm().item())
    assert errors[1] < errors[0]


def test_outputs_move_towards_the_full_precision_model():
    model, reference = loftq_model()
    x = torch.randn(16, 128)
    with torch.no_grad(), model.disable_adapter():
        quantized_only = model(x)
    with torch.no_grad():
        error_with = (model(x) - reference(x)).norm()
    assert error_with < 0.8 * (quantized_only - reference(x)).norm()


def test_refusals_leave_the_model_unchanged():
    quantized = quantize_model(MLP(), QuantizationConfig(load_in_4bit=True))
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    with pytest.raises(ConfigError, match="replace_lora_weights_loftq"):
        get_peft_model(quantized, LoraConfig(target_modules=["lin0"], init_lora_weights="loftq",
                                             loftq_config=LoftQConfig()))
    assert all(torch.equal(before[k], v) for k, v in quantized.state_dict().items())
    plain = MLP()
    weight = plain.lin0.weight.detach().clone()
    with pytest.raises(ConfigError, match="r <= min"):
        get_peft_model(plain, LoraConfig(r=100, target_modules=["lin0"], init_lora_weights="loftq",
                                         loftq_config=LoftQConfig()))
    assert torch.equal(plain.lin0.weight, weight)


def test_save_then_load_on_the_saved_base_gives_the_same_outputs(tmp_path):
    """The LoftQ workflow: save the adapter and the rewritten (quantized-value) base; loading the adapter
    onto that base re-runs LoftQ on Q (a fixed point of NF4), then the saved factors replace the fresh ones."""
    model, _ = loftq_model()
    with torch.no_grad():  # a trained adapter: the saved factors, not a re-run of the init, must come back
        model.base_model.model.lin0.lora_A["default"].weight.mul_(1.5)
    x = torch.randn(4, 128)
    expected = model(x)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(base_copy(model, MLP), str(tmp_path / "adapter"))
    torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ quantized base models
def _quantized_llama_and_file(tmp_path) -> tuple[nn.Module, nn.Module, str]:
    full = llama()
    full.save_pretrained(str(tmp_path / "full"))
    quantized = quantize_model(llama(), QuantizationConfig(load_in_4bit=True))
    return full, quantized, str(tmp_path / "full")


def test_replace_lora_weights_loftq_fits_each_quantized_layer(tmp_path):
    full, quantized, path = _quantized_llama_and_file(tmp_path)
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    inputs = {"input_ids": torch.randint(0, 96, (2, 12))}
    with torch.no_grad():
        before = (model(**inputs).logits - full(**inputs).logits).norm()
    replace_lora_weights_loftq(model, model_path=path)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = full.model.layers[0].self_attn.q_proj.weight.detach()
    dequantized = layer.base_layer.dequantize_weight(torch.float32)
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    torch.testing.assert_close(delta, truncated_svd(weight - dequantized, 4), atol=1e-5, rtol=0)
    with torch.no_grad():
        after = (model(**inputs).logits - full(**inputs).logits).norm()
    assert after < before


def test_replace_lora_weights_loftq_callback_rolls_back_and_errors_are_clear(tmp_path):
    full, quantized, path = _quantized_llama_and_file(tmp_path)
    model = get_peft_model(quantized, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    start = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    seen = []

    def reject_v(peft_model, name):
        seen.append(name)
        return not name.endswith("v_proj")

    replace_lora_weights_loftq(model, model_path=os.path.join(path, "model.safetensors"), callback=reject_v)
    assert sorted(seen) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    now = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key in start:
        assert torch.equal(now[key], start[key]) == ("v_proj" in key), key
    with pytest.raises(FileNotFoundError, match="safetensors"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path / "nowhere"))
    dense = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="No 4-bit quantized LoRA module"):
        replace_lora_weights_loftq(dense, model_path=path)
