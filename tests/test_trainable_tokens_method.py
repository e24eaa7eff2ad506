"""Trainable Tokens (peft's TRAINABLE_TOKENS method): config checks, the replaced rows by hand, tied output
layers, several adapters, checkpoint keys, and the shared property suite on tiny transformers.

The layer is the one LoRA's `trainable_token_indices` uses (tests/test_trainable_tokens.py covers that path).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, PeftConfig, PeftModel, TrainableTokensConfig, TrainableTokensModel, get_peft_model
from peftkit.tuners._core.trainable_tokens import TrainableTokensLayer
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

#: Token ids the tiny models' example batches contain (so random rows move the logits).
ROWS = [7, 13, 14, 25, 49]


def config_for(name: str, **overrides) -> TrainableTokensConfig:
    """Random (non-identity) rows of the input embedding of the tiny model `name`."""
    kwargs = dict(token_indices=ROWS, init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return TrainableTokensConfig(**kwargs)


class EmbModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.emb1 = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x) + self.emb1(x)).mean(1)


X = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(TrainableTokensConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.TrainableTokensConfig)}
    assert set(ours) == set(theirs)
    config = TrainableTokensConfig()
    assert config.token_indices == [] and config.target_modules is None and config.init_weights is True
    assert config.peft_type == "TRAINABLE_TOKENS"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"token_indices": "0,1"}, "token_indices='0,1' is invalid"),
        ({"token_indices": [0, 1.5]}, "token_indices=.* is invalid"),
        ({"token_indices": [True]}, "token_indices=.* is invalid"),
        ({"token_indices": [-1]}, ">= 0"),
        ({"target_modules": [1]}, "target_modules=.* is invalid"),
        ({"init_weights": "yes"}, "init_weights='yes' is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainableTokensConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_json_roundtrip_dispatches_to_trainable_tokens(tmp_path):
    TrainableTokensConfig(token_indices=[3, 1], target_modules=["emb"], init_weights=False).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is TrainableTokensConfig
    assert (loaded.token_indices, loaded.target_modules, loaded.init_weights) == ([3, 1], ["emb"], False)


def test_default_target_is_the_input_embedding_written_back():
    config = TrainableTokensConfig(token_indices=[1])
    model = get_peft_model(llama(), config)
    assert model.peft_config["default"].target_modules == "model.embed_tokens"
    assert type(model.base_model.model.model.embed_tokens) is TrainableTokensLayer
    plain = get_peft_model(EmbModel(), TrainableTokensConfig(token_indices=[1], target_modules=["emb"]))
    assert type(plain.base_model) is TrainableTokensModel


# ---------------------------------------------------------------------------------------------- the maths
def test_forward_replaces_the_rows():
    model = get_peft_model(EmbModel(), TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 7], init_weights=False))
    layer = model.base_model.model.emb
    rows = layer.trainable_tokens_delta["default"]
    assert rows.shape == (2, 8) and rows.requires_grad
    weight = layer.get_base_layer().weight.detach().clone()
    expected = weight.clone()
    expected[[1, 7]] = rows.detach()
    with torch.no_grad():
        prop.assert_close(layer(X), expected[X], atol=0)
    assert torch.equal(layer.trainable_tokens_original["default"], weight[[1, 7]])


def test_default_init_is_a_noop_and_trains_the_rows_only():
    base_out = EmbModel()(X)
    model = get_peft_model(EmbModel(), TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 7]))
    with torch.no_grad():
        prop.assert_close(model(X), base_out, atol=0)
    model(X).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"base_model.model.emb.trainable_tokens_delta.default"}
    assert model.get_nb_trainable_parameters()[0] == 16


def test_empty_token_indices_is_a_noop_as_in_peft():
    model = get_peft_model(EmbModel(), TrainableTokensConfig(target_modules=["emb"]))
    with torch.no_grad():
        prop.assert_close(model(X), EmbModel()(X), atol=0)


def test_out_of_range_and_unsupported_targets_are_refused():
    with pytest.raises(ConfigError, match="not rows of an embedding with 20 rows"):
        get_peft_model(EmbModel(), TrainableTokensConfig(target_modules=["emb"], token_indices=[20]))
    with pytest.raises(ConfigError, match="need an nn.Embedding"):
        get_peft_model(gpt2(), TrainableTokensConfig(target_modules=["c_attn"], token_indices=[1]))


def test_merge_writes_the_rows_and_unmerge_restores_them_exactly():
    model = get_peft_model(EmbModel(), TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 7], init_weights=False))
    layer = model.base_model.model.emb
    original = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        adapted = model(X)
        model.merge_adapter()
        assert torch.equal(layer.get_base_layer().weight[[1, 7]], layer.trainable_tokens_delta["default"])
        prop.assert_close(model(X), adapted, atol=0)
        model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, original)
    merged = model.merge_and_unload()
    assert type(merged.emb) is nn.Embedding
    with torch.no_grad():
        prop.assert_close(merged(X), adapted, atol=0)


# ---------------------------------------------------------------------------------------------- several adapters
def test_two_adapters_on_disjoint_rows_work_together_and_overlaps_are_refused():
    torch.manual_seed(3)
    model = get_peft_model(EmbModel(), TrainableTokensConfig(target_modules=["emb"], token_indices=[1], init_weights=False))
    model.add_adapter("other", TrainableTokensConfig(target_modules=["emb", "emb1"], token_indices=[7], init_weights=False))
    model.add_adapter("clash", TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 2], init_weights=False))
    emb = model.base_model.model.emb
    assert emb.active_adapters == ["default"]
    assert not emb.trainable_tokens_delta["other"].requires_grad
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(X)
        expected = emb.get_base_layer().weight.clone()
        expected[1] = emb.trainable_tokens_delta["default"]
        expected[7] = emb.trainable_tokens_delta["other"]
        prop.assert_close(emb(X), expected[X], atol=0)
        model.merge_adapter(["default", "other"])
        prop.assert_close(model(X), both, atol=1e-6)
        model.unmerge_adapter()
    model.base_model.set_adapter(["default", "clash"])
    with pytest.raises(ValueError, match="Token indices of adapter clash are already defined"):
        model(X)
    model.base_model.set_adapter("other")
    model.delete_adapter("other")
    assert "other" not in emb.trainable_tokens_delta
    assert type(model.base_model.model.emb1) is nn.Embedding  # its only adapter is gone: unwrapped
    model.set_requires_grad("clash")
    assert emb.trainable_tokens_delta["clash"].requires_grad


def test_adapters_switch():
    inputs = lm_inputs()
    second = config_for("llama", token_indices=[13, 78, 80])
    prop.check_adapters_switch(llama, inputs, config_for("llama"), second)


# ---------------------------------------------------------------------------------------------- tied embeddings
def test_tied_output_layer_shares_the_rows():
    model = get_peft_model(gpt2(), config_for("gpt2"))
    inner = model.base_model.model
    wte, head = inner.transformer.wte, inner.lm_head
    assert type(wte) is TrainableTokensLayer and type(head) is TrainableTokensLayer
    assert head.tied_adapter is wte and head.trainable_tokens_delta is wte.trainable_tokens_delta
    assert head.get_base_layer().weight is wte.get_base_layer().weight
    assert model.get_nb_trainable_parameters()[0] == len(ROWS) * 32
    inputs = lm_inputs()
    with torch.no_grad():
        hidden = model.base_model.model.transformer(input_ids=inputs["input_ids"]).last_hidden_state
        logits = model(**inputs).logits
        prop.assert_close(logits, hidden @ wte.get_merged_weights(["default"]).T)
    prop.check_merge_equals_unmerged(gpt2, inputs, config_for("gpt2"))
    prop.check_merge_unmerge_restores_weights(gpt2, config_for("gpt2"))
    prop.check_disable_gives_base(gpt2, inputs, config_for("gpt2"))


def test_tied_checkpoint_writes_both_keys_as_peft(tmp_path):
    model = get_peft_model(gpt2(), config_for("gpt2"))
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == ["base_model.model.lm_head.trainable_tokens_delta", "base_model.model.transformer.wte.trainable_tokens_delta"]
    loaded = PeftModel.from_pretrained(gpt2(), str(tmp_path))
    assert type(loaded.base_model.model.lm_head) is TrainableTokensLayer
    prop.assert_close(prop.output_of(loaded, lm_inputs()), prop.output_of(model, lm_inputs()), atol=0)


def test_tied_merge_and_unload_keeps_the_tie_and_no_tied_warning(recwarn):
    model = get_peft_model(gpt2(), config_for("gpt2"))
    expected = prop.output_of(model, lm_inputs())
    merged = model.merge_and_unload()
    assert not [w for w in recwarn if "tie_word_embeddings" in str(w.message)]
    assert type(merged.lm_head) is nn.Linear and merged.lm_head.weight is merged.transformer.wte.weight
    prop.assert_close(prop.output_of(merged, lm_inputs()), expected)


def test_tied_layer_goes_with_its_last_adapter():
    model = get_peft_model(gpt2(), config_for("gpt2"))
    model.add_adapter("other", config_for("gpt2", token_indices=[3]))
    assert model.base_model.model.lm_head.tied_adapter is model.base_model.model.transformer.wte
    model.delete_adapter("default")
    assert type(model.base_model.model.lm_head) is TrainableTokensLayer
    model.delete_adapter("other")
    assert type(model.base_model.model.lm_head) is nn.Linear
    assert type(model.base_model.model.transformer.wte) is nn.Embedding


def test_embedding_and_head_targeted_together_are_tied():
    model = get_peft_model(gpt2(), config_for("gpt2", target_modules=["wte", "lm_head"]))
    head = model.base_model.model.lm_head
    assert head.tied_adapter is model.base_model.model.transformer.wte
    assert type(head.base_layer) is nn.Linear


def test_bf16_rows_are_kept_in_fp32_unless_asked():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    layer = model.base_model.model.model.embed_tokens
    assert layer.trainable_tokens_delta["default"].dtype == torch.float32
    plain = get_peft_model(llama().to(torch.bfloat16), config_for("llama"), autocast_adapter_dtype=False)
    assert plain.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- property suite
CASES = ["llama", "gpt2", "bert"]


@pytest.mark.parametrize("case", CASES)
def test_fresh_adapter_is_noop(case):
    tiny = MODEL_FACTORIES[case]
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for(case, init_weights=True))


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged(case):
    tiny = MODEL_FACTORIES[case]
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config_for(case))


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_restores_weights(case):
    prop.check_merge_unmerge_restores_weights(MODEL_FACTORIES[case].make_model, config_for(case))


@pytest.mark.parametrize("case", CASES)
def test_disable_gives_base(case):
    tiny = MODEL_FACTORIES[case]
    prop.check_disable_gives_base(tiny.make_model, tiny.make_inputs(), config_for(case))


@pytest.mark.parametrize("case", CASES)
def test_save_load_roundtrip(case, tmp_path):
    tiny = MODEL_FACTORIES[case]
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config_for(case), tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_only_adapter_rows_train(case):
    tiny = MODEL_FACTORIES[case]
    prop.check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), config_for(case))
    model = get_peft_model(tiny.make_model(), config_for(case))
    model.train()
    model(**tiny.make_inputs()).loss.backward()
    grads = [p for p in model.parameters() if p.grad is not None]
    assert len(grads) == 1 and grads[0].shape[0] == len(ROWS)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_training_lowers_loss(case):
    tiny = MODEL_FACTORIES[case]
    config = config_for(case, init_weights=True, token_indices=sorted(set(tiny.make_inputs()["input_ids"].flatten().tolist())))
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config, lr=0.1)
