"""LoRA-GA: the gradient pass, the init by its formula and as peft computes it (same seed, same factors
and residual base), outputs kept at init, the gradient cache, the conversion to plain LoRA, and checkpoints
both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peftkit import ConfigError, LoraConfig, LoraGAConfig, PeftModel, preprocess_loraga
from tests.interop_helpers import base_copy, nudge_adapter
from tests.tiny_models import VOCAB, gpt2, llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def batch(seed: int = 0) -> dict:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train_step_for(model):
    def train_step() -> None:
        for seed in range(2):
            model(**batch(seed)).loss.backward()
    return train_step


def loraga_model(lib, make=llama, targets=TARGETS, seed: int = 3, **ga) -> torch.nn.Module:
    base = make()
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                            lora_ga_config=lib.LoraGAConfig(**ga))
    lib.preprocess_loraga(base, config, train_step_for(base))
    torch.manual_seed(seed)
    return lib.get_peft_model(base, config)


def test_config_matches_peft_and_refuses_unknown_choices():
    peft = pytest.importorskip("peft")
    assert {f.name: f.default for f in dataclasses.fields(LoraGAConfig)} == {
        f.name: f.default for f in dataclasses.fields(peft.LoraGAConfig)}
    with pytest.raises(ConfigError, match="direction='BA'"):
        LoraGAConfig(direction="BA")
    with pytest.raises(ConfigError, match="scale='big'"):
        LoraGAConfig(scale="big")
    saved = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(scale="unit")).to_dict()
    assert LoraConfig.from_dict(saved).lora_ga_config == LoraGAConfig(scale="unit")
    with pytest.raises(ValueError, match="lora_ga_config=LoraGAConfig"):
        preprocess_loraga(llama(), LoraConfig(target_modules=TARGETS), lambda: None)


def test_gradients_are_the_average_over_the_backward_passes_and_nothing_else_changes():
    model = llama()
    config = LoraConfig(target_modules=["q_proj"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    reference = llama()
    for seed in range(2):
        reference(**batch(seed)).loss.backward()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    preprocess_loraga(model, config, train_step_for(model))
    layer = model.model.layers[0].self_attn.q_proj
    expected = reference.model.layers[0].self_attn.q_proj.weight.grad / 2
    torch.testing.assert_close(layer._peft_loraga_grad, expected, atol=1e-6, rtol=1e-5)
    assert not hasattr(model.model.layers[0].self_attn.v_proj, "_peft_loraga_grad")
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires and not model.training


@pytest.mark.parametrize("ga", [{}, {"direction": "ArBr", "scale": "gd_scale"}, {"direction": "A2rBr", "scale": "unit"},
                                {"direction": "random", "scale": "weight_svd"}])
def test_same_factors_and_residual_base_as_peft_and_outputs_kept(ga):
    peft = pytest.importorskip("peft")
    import peftkit

    ours, theirs = loraga_model(peftkit, **ga), loraga_model(peft, **ga)
    inputs = batch(5)
    for name, param in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], param, atol=1e-6, rtol=1e-5, msg=name)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # not a zero init: the base absorbs it
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, llama()(**inputs).logits, atol=1e-5, rtol=0)


def test_the_default_split_by_formula():
    import peftkit

    base = llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    preprocess_loraga(base, config, train_step_for(base))
    grad = base.model.layers[0].self_attn.q_proj._peft_loraga_grad.clone()
    torch.manual_seed(0)
    model = peftkit.get_peft_model(base, config)
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(grad, q=16, niter=4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_A["default"].weight, v.t()[:4])
    scale = grad.shape[0] ** 0.25 / 16**0.5
    torch.testing.assert_close(layer.lora_B["default"].weight, u[:, 4:8] @ torch.diag(s[4:8]) * scale)


def test_conv1d_layers_use_the_transposed_gradient():
    import peftkit

    model = loraga_model(peftkit, make=gpt2, targets=["c_attn"])
    inputs = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, gpt2()(**inputs).logits, atol=1e-5, rtol=0)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (4, 32) and layer.lora_B["default"].weight.shape == (96, 4)


def test_cache_file_round_trip(tmp_path):
    base = llama()
    config = LoraConfig(target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    cache = str(tmp_path / "grads" / "cache.pt")
    preprocess_loraga(base, config, train_step_for(base), cache_file=cache)
    again = llama()
    calls = []
    preprocess_loraga(again, config, lambda: calls.append(1), cache_file=cache)
    assert not calls  # read, not recomputed
    first = base.model.layers[1].mlp.down_proj._peft_loraga_grad
    assert torch.equal(again.model.layers[1].mlp.down_proj._peft_loraga_grad, first)
    assert torch.load(cache, weights_only=True).keys() == {
        f"model.layers.{i}.{p}._peft_loraga_grad" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


def test_converted_to_plain_lora_it_works_on_the_original_base(tmp_path):
    import peftkit

    model = loraga_model(peftkit)
    model.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial adapter as plain LoRA
    model.save_pretrained(str(tmp_path / "init"))
    model.peft_config["default"].init_lora_weights = "lora_ga"
    nudge_adapter(model)
    inputs = batch(7)
    expected = model(**inputs).logits
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = PeftModel.from_pretrained(llama(), str(tmp_path / "plain"))
    assert plain.peft_config["default"].init_lora_weights is True and plain.peft_config["default"].r == 8
    torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-4, rtol=0)


def test_checkpoints_move_between_peft_and_peftkit_on_the_residual_base(tmp_path):
    peft = pytest.importorskip("peft")
    import peftkit

    inputs = batch(9)
    for source, target in ((peftkit, peft), (peft, peftkit)):
        model = nudge_adapter(loraga_model(source))
        folder = str(tmp_path / source.__name__)
        model.save_pretrained(folder)
        with torch.no_grad():
            expected = model(**inputs).logits
        loaded = target.PeftModel.from_pretrained(base_copy(model, llama), folder)  # onto the residual base
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=0)
