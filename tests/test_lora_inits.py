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
