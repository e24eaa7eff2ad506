"""Trainable token rows beside LoRA (`trainable_token_indices`): peft's layout both ways, merge, tying."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.tuners._core.trainable_tokens import TrainableTokensWrapper
from tests.tiny_models import gpt2, lm_inputs


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin0 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin0(self.emb(x)))).mean(1)


def _base() -> Model:
    torch.manual_seed(0)
    return Model()


X = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])


def _config(**kwargs) -> dict:
    return dict(target_modules=["lin0"], init_lora_weights=False, trainable_token_indices={"emb": [0, 1, 2]}, **kwargs)


def test_rows_move_both_ways_with_peft(tmp_path):
    import peft

    theirs = peft.get_peft_model(_base(), peft.LoraConfig(**_config()))
    with torch.no_grad():  # rows that differ from the base rows
        theirs.base_model.model.emb.token_adapter.trainable_tokens_delta["default"].mul_(3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(_base(), tmp_path / "peft")
    assert isinstance(ours.base_model.model.emb, TrainableTokensWrapper)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(X), theirs(X), atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.emb.token_adapter.trainable_tokens_delta" in keys
    assert not any("emb.weight" in key or "base_layer" in key for key in keys)  # rows only, not the matrix
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back(X), ours(X), atol=1e-6)


def test_merge_disable_unload_and_training_touch_only_the_rows():
    torch.manual_seed(1)
    model = get_peft_model(_base(), LoraConfig(**_config()))
    layer = model.base_model.model.emb.token_adapter
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].add_(1.0)
        adapted = model(X)
        model.merge_adapter()
        assert torch.allclose(model(X), adapted, atol=1e-6)
        model.unmerge_adapter()
        assert torch.equal(layer.base_layer.weight, _base().emb.weight)  # exact: rows are replaced, not offset
        with model.disable_adapter():
            assert torch.allclose(model(X), _base()(X), atol=1e-6)
    embedding_before = layer.base_layer.weight.detach().clone()
    model(X).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {
        "base_model.model.emb.token_adapter.trainable_tokens_delta.default",
        "base_model.model.lin0.lora_A.default.weight",
        "base_model.model.lin0.lora_B.default.weight",
    }
    assert torch.equal(layer.base_layer.weight, embedding_before)
    merged = model.merge_and_unload()
    assert type(merged.emb) is nn.Embedding
    with torch.no_grad():
        assert torch.allclose(merged(X), adapted, atol=1e-5)
        assert torch.equal(merged.emb.weight[3:], _base().emb.weight[3:])


def test_adapters_on_one_embedding_switch_and_cannot_be_active_together():
    model = get_peft_model(_base(), LoraConfig(**_config()), adapter_name="a")
    model.add_adapter("b", LoraConfig(**{**_config(), "trainable_token_indices": {"emb": [3, 4]}}))
    wrapper = model.base_model.model.emb
    assert set(wrapper.held_adapters()) == {"a", "b"}
    with torch.no_grad():
        wrapper.token_adapter.trainable_tokens_delta["b"].add_(2.0)
        first = model(X)
        model.set_adapter("b")
        assert not torch.allclose(model(X), first, atol=1e-4)
    assert wrapper.token_adapter.trainable_tokens_delta["b"].requires_grad
    assert not wrapper.token_adapter.trainable_tokens_delta["a"].requires_grad
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
        model.base_model.set_adapter(["a", "b"])
    model.delete_adapter("a")
    assert wrapper.held_adapters() == ["b"]


def test_tied_output_layer_shares_the_rows_and_is_saved_once(tmp_path):
    import peft

    model = get_peft_model(gpt2(), LoraConfig(target_modules=["c_attn"], trainable_token_indices=[1, 2, 3]))
    inner = model.base_model.model
    embedding, head = inner.transformer.wte, inner.lm_head
    assert isinstance(embedding, TrainableTokensWrapper) and isinstance(head, TrainableTokensWrapper)
    assert head.token_adapter.trainable_tokens_delta is embedding.token_adapter.trainable_tokens_delta
    with torch.no_grad():
        embedding.token_adapter.trainable_tokens_delta["default"].add_(0.5)
        logits = model(**lm_inputs()).logits
        # the head uses the same replaced rows: its logits for tokens 1..3 follow the new rows
        hidden = model(**lm_inputs(), output_hidden_states=True).hidden_states[-1]
        rows = embedding.token_adapter.trainable_tokens_delta["default"]
        assert torch.allclose(logits[..., 1:4], hidden @ rows.T, atol=1e-4)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert [k for k in keys if "trainable_tokens" in k] == ["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"]
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(theirs(**lm_inputs()).logits, logits, atol=1e-4)


def test_bad_indices_and_conflicts_are_refused_before_changes():
    with pytest.raises(ValueError, match="trainable_token_indices=.*invalid"):
        LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": ["a"]})
    with pytest.raises(ValueError, match="not rows of an embedding with 20 rows"):
        get_peft_model(_base(), LoraConfig(**{**_config(), "trainable_token_indices": {"emb": [25]}}))
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        get_peft_model(_base(), LoraConfig(**_config(modules_to_save=["emb"])))
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(_base(), LoraConfig(**{**_config(), "trainable_token_indices": {"nothing": [0]}}))
    model = get_peft_model(_base(), LoraConfig(**_config()), adapter_name="a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        model.add_adapter("b", LoraConfig(**{**_config(), "trainable_token_indices": {"emb": [99]}}))
    assert set(model.peft_config) == {"a"} and model.base_model.model.emb.held_adapters() == ["a"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
