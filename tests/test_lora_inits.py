"""LoRA inits peft offers besides the default: "orthogonal"."""

from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError
from tests.properties import output_of
from tests.tiny_models import llama, lm_inputs

TARGETS = ["q_proj", "v_proj"]


def test_orthogonal_init_draws_what_peft_draws_and_round_trips(tmp_path):
    import peft

    torch.manual_seed(7)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="orthogonal"))
    torch.manual_seed(7)
    ours = get_peft_model(llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="orthogonal"))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    theirs_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(a, theirs_layer.lora_A["default"].weight) and torch.equal(b, theirs_layer.lora_B["default"].weight)
    # A's rows are orthogonal directions scaled by 1/10 (times a Gaussian mix), and B A != 0: not a no-op.
    assert (b @ a).abs().sum() > 0
    with ours.disable_adapter():
        base = output_of(ours, lm_inputs())
    assert not torch.allclose(output_of(ours, lm_inputs()), base)
    ours.save_pretrained(tmp_path)
    assert torch.equal(output_of(PeftModel.from_pretrained(llama(), tmp_path), lm_inputs()), output_of(ours, lm_inputs()))


def test_orthogonal_init_refusals():
    with pytest.raises(ConfigError, match="rank to be even, got 3"):
        get_peft_model(llama(), LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="orthogonal"))
    with pytest.raises(ConfigError, match="orthogonal' works on Linear layers only"):
        get_peft_model(llama(), LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="orthogonal"))


def test_mica_init_matches_peft_freezes_b_and_starts_as_the_base(tmp_path):
    """MiCA: B = the minor left singular vectors of W (frozen), A = 0; peft draws the same and loads ours."""
    import peft

    config = dict(target_modules=["q_proj", "embed_tokens"], init_lora_weights="mica", r=4)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**config))
    ours = get_peft_model(llama(), LoraConfig(**config))
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if ".lora_" in name:
            other = theirs_params[name]
            assert param.requires_grad == other.requires_grad, name
            assert torch.allclose(param.abs(), other.abs(), atol=1e-5), name  # singular vectors up to sign
    assert not ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(output_of(ours, lm_inputs()), output_of(llama(), lm_inputs()), atol=1e-6)
    ours.train()
    ours(**lm_inputs()).logits.sum().backward()
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained and all("lora_A" in n or "lora_embedding_A" in n for n in trained)
    ours.set_adapter("default")  # switching keeps B frozen
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_B" in n or "lora_embedding_B" in n)
    with pytest.raises(ConfigError, match="MiCA requires `r` <= min"):
        get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="mica", r=64))
