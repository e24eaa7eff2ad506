"""LoRA with `lora_bias=True` (peft's option): B carries a bias, `y = W x + b + scaling * (B A x + b_B)`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError
from tests.properties import output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, gpt2, lm_inputs

TARGETS = ["query", "value"]


def bias_config(**overrides) -> LoraConfig:
    return LoraConfig(**{"task_type": "SEQ_CLS", "target_modules": TARGETS, "lora_bias": True, "init_lora_weights": False, **overrides})


def test_peft_adapter_with_lora_bias_loads_with_its_outputs_and_ours_loads_in_peft(tmp_path):
    import peft

    torch.manual_seed(3)
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, lora_bias=True, init_lora_weights=False)
    theirs = peft.get_peft_model(bert_seq_cls(), config)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(bert_seq_cls(), tmp_path / "peft")
    layer = ours.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_B["default"].bias is not None and layer.lora_B["default"].bias.abs().sum() > 0
    assert torch.allclose(output_of(ours, cls_inputs()), output_of(theirs, cls_inputs()), atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(bert_seq_cls(), tmp_path / "ours")
    assert torch.allclose(output_of(back, cls_inputs()), output_of(ours, cls_inputs()), atol=1e-5)


@pytest.mark.parametrize("make, targets, inputs", [(bert_seq_cls, TARGETS, cls_inputs), (gpt2, ["c_attn"], lm_inputs)],
                         ids=["linear", "conv1d"])
def test_merge_adds_the_scaled_b_bias_and_unmerge_restores(make, targets, inputs):
    task = "SEQ_CLS" if make is bert_seq_cls else "CAUSAL_LM"
    model = get_peft_model(make(), bias_config(target_modules=targets, task_type=task))
    name, layer = next(iter(model.base_model.tuner_layers()))
    base = layer.get_base_layer()
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    unmerged = output_of(model, inputs())
    model.merge_adapter()
    expected_bias = bias + layer.lora_B["default"].bias.detach() * layer.scaling["default"]
    assert torch.allclose(base.bias, expected_bias, atol=1e-6)
    assert torch.allclose(output_of(model, inputs()), unmerged, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(base.weight, weight, atol=1e-6) and torch.allclose(base.bias, bias, atol=1e-6)
    merged = model.merge_and_unload()
    assert torch.allclose(output_of(merged, inputs()), unmerged, atol=1e-5)


def test_fresh_adapter_is_a_no_op_and_the_b_bias_trains():
    model = get_peft_model(bert_seq_cls(), bias_config(init_lora_weights=True))
    with model.disable_adapter():
        base = output_of(model, cls_inputs())
    assert torch.equal(output_of(model, cls_inputs()), base)  # B and b_B start at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_B.default.bias") for n in trainable)
    model.train()
    model(**cls_inputs()).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B.default.bias")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_mixed_batch_with_lora_bias_adapters_matches_each_adapter_alone():
    model = get_peft_model(bert_seq_cls(), bias_config())
    torch.manual_seed(5)
    model.add_adapter("other", bias_config())
    inputs = cls_inputs()
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = output_of(model, inputs)
    model.eval()
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "other"]).logits
    assert torch.allclose(mixed[0], per_adapter["default"][0], atol=1e-5)
    assert torch.allclose(mixed[1], per_adapter["other"][1], atol=1e-5)


def test_lora_bias_refusals():
    with pytest.raises(ConfigError, match="lora_bias=True is not supported for DoRA"):
        LoraConfig(target_modules=TARGETS, lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="only supported with init_lora_weights=True or False"):
        LoraConfig(target_modules=TARGETS, lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="not supported for Embedding"):
        get_peft_model(bert_seq_cls(), bias_config(target_modules=["word_embeddings"]))
    model = get_peft_model(bert_seq_cls(), bias_config())
    with pytest.raises(ConfigError, match="lora_bias=True.*drop it"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    assert "combined" not in model.peft_config


def test_a_base_without_bias_warns_and_refuses_merging_unchanged():
    model = nn.Sequential(nn.Linear(6, 6, bias=False))
    with pytest.warns(UserWarning, match="has no bias. This means that merging LoRA weights won't be possible"):
        peft_model = get_peft_model(model, LoraConfig(target_modules=["0"], lora_bias=True, init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        peft_model.merge_adapter()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)
