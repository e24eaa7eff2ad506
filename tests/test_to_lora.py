"""`convert_to_lora` / `save_as_lora`: every convertible method becomes a LoRA adapter with the same
outputs (at full energy), truncation is the best rank-k fit, the refusals, and the folder loads in peft
and in peftkit; the same factors as peft's converter."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoHaConfig, PeftModel, get_peft_model
from peftkit.tuners._core.layer import BaseTunerLayer
from peftkit.checkpoint.to_lora import convert_to_lora, energy_rank, lora_factors, save_as_lora
from tests.test_registry import CONFIGS
from tests.tiny_models import gpt2, llama, lm_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _adapted(peft_type: str):
    torch.manual_seed(0)
    return get_peft_model(llama(), CONFIGS[peft_type]())


def _convertible(model) -> bool:
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(m.supports_lora_conversion() for m in layers)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


CONVERTIBLE = ["LOHA", "LOKR", "VERA", "TINYLORA", "C3A", "FOURIERFT", "WAVEFT", "VBLORA", "UNILORA", "RANDLORA",
               "GRALORA", "DELORA", "MISS", "PSOFT"]


@pytest.mark.parametrize("peft_type", CONVERTIBLE)
def test_full_energy_conversion_reproduces_the_adapter(peft_type, tmp_path):
    model = _adapted(peft_type)
    assert _convertible(model)
    inputs = lm_inputs()
    save_as_lora(tmp_path, model, rank=1.0)
    lora = PeftModel.from_pretrained(llama(), str(tmp_path))
    assert lora.peft_config["default"].r == lora.peft_config["default"].lora_alpha == 1
    torch.testing.assert_close(_logits(lora, inputs), _logits(model, inputs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("peft_type", ["LORA", "IA3", "OFT", "HIRA", "SHIRA", "BOFT", "DEFT", "PVERA"])
def test_methods_without_an_additive_delta_are_refused(peft_type):
    model = _adapted(peft_type)
    if peft_type == "LORA":  # LoRA itself converts (with a warning): it is already LoRA
        with pytest.warns(UserWarning, match="already a LoRA adapter"):
            convert_to_lora(model, rank=2)
        return
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=4)


def test_int_rank_is_the_best_rank_k_fit_and_thresholds_pick_per_layer_ranks():
    model = _adapted("LOHA")
    config, state = convert_to_lora(model, rank=3)
    assert config.r == config.lora_alpha == 3 and not config.rank_pattern
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"],
                               u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)
    config, _ = convert_to_lora(model, rank=0.5)
    ranks = config.rank_pattern
    assert ranks and ranks == config.alpha_pattern
    assert ranks["model.layers.0.self_attn.q_proj"] == energy_rank(s, 0.5)
    assert energy_rank(torch.tensor([3.0, 1.0, 1.0]), 0.8) == 1 and energy_rank(torch.tensor([3.0, 1.0, 1.0]), 0.9) == 2


def test_conv1d_factors_come_in_the_transposed_layout(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(gpt2(), LoHaConfig(r=2, alpha=4, target_modules=["c_attn"], init_weights=False))
    save_as_lora(tmp_path, model, rank=1.0)
    lora = PeftModel.from_pretrained(gpt2(), str(tmp_path))
    inputs = lm_inputs()
    torch.testing.assert_close(_logits(lora, inputs), _logits(model, inputs), atol=1e-4, rtol=1e-4)
    weight_a, weight_b, _ = lora_factors(torch.randn(32, 96), 4, transposed=True)
    assert weight_a.shape == (4, 32) and weight_b.shape == (96, 4)


def test_bad_ranks_and_models_are_refused():
    model = _adapted("LOHA")
    with pytest.raises(ValueError, match="between 0 and 1 but got 1.5"):
        convert_to_lora(model, rank=1.5)
    with pytest.raises(ValueError, match="rank of 0"):
        convert_to_lora(model, rank=0)
    with pytest.raises(ValueError, match="larger than the weight shape"):
        convert_to_lora(model, rank=100)
    with pytest.raises(TypeError, match="Could not detect any layer"):
        convert_to_lora(llama(), rank=2)


def test_same_lora_as_pefts_converter_and_the_folder_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(llama(), peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                                                          init_weights=False))
    theirs.save_pretrained(str(tmp_path / "loha"))
    ours = PeftModel.from_pretrained(llama(), str(tmp_path / "loha"))
    their_config, their_state = peft.convert_to_lora(theirs, rank=4)
    our_config, our_state = convert_to_lora(ours, rank=4)
    assert set(our_state) == set(their_state)
    for key, value in their_state.items():  # singular vectors are unique up to sign: compare the products
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(our_state[b_key] @ our_state[key], their_state[b_key] @ value, atol=1e-5, rtol=0)
    assert (our_config.r, our_config.lora_alpha, our_config.rank_pattern) == (
        their_config.r, their_config.lora_alpha, their_config.rank_pattern)
    save_as_lora(tmp_path / "as_lora", ours, rank=1.0)
    in_peft = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "as_lora"))
    torch.testing.assert_close(_logits(in_peft, lm_inputs()), _logits(theirs, lm_inputs()), atol=1e-4, rtol=1e-4)


def test_reading_only_the_model_is_unchanged():
    model = _adapted("VERA")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_lora(model, rank=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert hasattr(peftkit, "convert_to_lora") and hasattr(peftkit, "save_as_lora")
