"""`ensure_weight_tying`: LoRA on a tied embedding / output layer, as peft ties it (keys, outputs, merge)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.tuners.lora.tied import TiedLinear
from tests.tiny_models import VOCAB, lm_inputs


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**lm_inputs()).logits


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "q_proj"]])
def test_tied_layers_share_the_update_in_both_libraries(targets, tmp_path):
    import peft

    config = dict(target_modules=targets, init_lora_weights=False, ensure_weight_tying=True)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(tied_llama(), tmp_path / "peft")
    assert isinstance(ours.base_model.model.lm_head, TiedLinear)
    assert torch.allclose(_logits(ours), _logits(theirs), atol=1e-4)
    assert not torch.allclose(_logits(ours), _logits(tied_llama()), atol=1e-2)
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.lora_A.weight", "base_model.model.model.embed_tokens.lora_embedding_A"} <= keys
    back = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours")
    assert torch.allclose(_logits(back), _logits(ours), atol=1e-4)


def test_tied_update_trains_once_merges_once_and_the_tie_survives_unloading():
    torch.manual_seed(1)
    config = LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False, ensure_weight_tying=True)
    model = get_peft_model(tied_llama(), config)
    head, embedding = model.base_model.model.lm_head, model.base_model.model.model.embed_tokens
    assert list(head.parameters()) == [embedding.get_base_layer().weight]  # no adapter tensors of its own
    # the head's update is the embedding's: delta of the shared matrix, seen from both sides
    assert torch.allclose(head.get_delta_weight("default"), embedding.get_delta_weight("default"), atol=1e-6)
    adapted = _logits(model)
    model.merge_adapter()
    assert torch.allclose(_logits(model), adapted, atol=1e-4)
    model.unmerge_adapter()
    assert torch.allclose(embedding.get_base_layer().weight, tied_llama().model.embed_tokens.weight, atol=1e-6)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.allclose(_logits(merged), adapted, atol=1e-4)


def test_weight_tying_warnings_as_peft():
    from torch import nn

    with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
        get_peft_model(tied_llama(), LoraConfig(target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="no tied modules are added"):
        get_peft_model(tied_llama(), LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True))
    untied = tied_llama()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.warns(UserWarning, match="no tied modules were found"):
        get_peft_model(untied, LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tied_llama(), LoraConfig(target_modules=["q_proj"]))  # nothing tied is adapted: silent


def test_modules_to_save_copies_stay_tied(tmp_path):
    config = LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    model = get_peft_model(tied_llama(), config)
    inner = model.base_model.model
    assert inner.lm_head.modules_to_save["default"].weight is inner.model.embed_tokens.modules_to_save["default"].weight
    model.train()
    model(**lm_inputs()).loss.backward()
    with torch.no_grad():
        inner.model.embed_tokens.modules_to_save["default"].weight.add_(0.1)
    assert torch.equal(inner.lm_head.modules_to_save["default"].weight, inner.model.embed_tokens.modules_to_save["default"].weight)
