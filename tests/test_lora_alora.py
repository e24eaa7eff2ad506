"""Activated LoRA (`alora_invocation_tokens`): the base model before the invocation, peft's outputs after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.tuners.lora.alora import calculate_offsets
from tests.tiny_models import llama

INVOCATION = [5, 6, 7]
IDS = torch.tensor([[10, 11, 12, 5, 6, 7, 20, 21], [30, 31, 32, 33, 34, 35, 36, 37], [5, 6, 7, 1, 2, 5, 6, 7]])
CONFIG = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False,
              alora_invocation_tokens=INVOCATION)


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def _ours() -> PeftModel:
    torch.manual_seed(1)
    return get_peft_model(llama(), LoraConfig(**CONFIG)).eval()


def test_offsets_start_at_the_last_invocation():
    configs = {"a": LoraConfig(**CONFIG), "plain": LoraConfig(target_modules=["q_proj"])}
    assert calculate_offsets(configs, "a", IDS) == [5, None, 3]
    assert calculate_offsets(configs, "plain", IDS) == [None, None, None]


def test_base_model_before_the_invocation_adapter_after():
    model = _ours()
    adapted, base = _logits(model), _logits(llama())
    differs = (adapted - base).abs().amax(-1) > 1e-4
    assert differs.tolist() == [
        [False, False, False, True, True, True, True, True],
        [False] * 8,  # no invocation: the base model throughout
        [False, False, False, False, False, True, True, True],
    ]
    explicit = _logits(model, alora_offsets=[8, 8, 8])  # given offsets win: the whole rows are adapted
    assert ((explicit - base).abs().amax(-1) > 1e-4).all()


def test_adapters_move_both_ways_with_peft_forward_and_generate(tmp_path):
    import peft

    torch.manual_seed(1)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG))
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(llama(), tmp_path / "peft")
    assert torch.allclose(_logits(ours), _logits(theirs), atol=1e-5)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        expected = theirs.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    assert torch.allclose(_logits(back), _logits(ours), atol=1e-5)


def test_training_reaches_the_adapter_through_invoked_positions_only():
    model = _ours().train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    out = model(input_ids=IDS[1:2]).logits  # the row without an invocation: no gradient to the adapter
    out.sum().backward()
    assert layer.lora_B["default"].weight.grad is None or not layer.lora_B["default"].weight.grad.any()
    model.zero_grad()
    model(input_ids=IDS[:1]).logits.sum().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_refusals_leave_the_model_as_it_was():
    model = _ours()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.merged
    model.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="do not support aLoRA"):
        model(input_ids=IDS, adapter_names=["default", "other", "default"])
    conv = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="aLoRA .* does not support adapting Conv2d"):
        get_peft_model(conv, LoraConfig(target_modules=["0"], alora_invocation_tokens=[1]))
    with pytest.raises(ValueError, match="alora_invocation_tokens=.*invalid"):
        LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens="<|assistant|>")
    with pytest.warns(UserWarning, match="only supported for CAUSAL_LM"):
        LoraConfig(alora_invocation_tokens=[1, 2])
