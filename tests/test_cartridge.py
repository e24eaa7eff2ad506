"""Cartridges on tiny models: config, the KV prefix by hand, the frozen attention sink, training,
save -> load, the prefill initialisers and composition."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import peftkit
from peftkit import (
    CartridgeConfig, ConfigError, LoraConfig, PeftModel, PrefixTuningConfig, compose_cartridge_adapters, get_peft_model,
    initialize_kv_prefix_from_past_key_values, initialize_kv_prefix_from_text, load_peft_weights,
    prompt_embeddings_from_past_key_values)
from peftkit.errors import CheckpointError
from tests.properties import assert_close, assert_differs, check_generate_equals_greedy, output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, llama, lm_inputs, seq2seq_inputs, t5

N = 4
PREFIX_IDS = torch.tensor([[11, 12, 13, 14, 15]])


def _model(make_model=llama, task="CAUSAL_LM", **kwargs):
    torch.manual_seed(0)
    return get_peft_model(make_model(), CartridgeConfig(task_type=task, num_virtual_tokens=N, **kwargs)).eval()


def _encoder(model):
    return model.base_model.prompt_encoder["default"]


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_and_shape_fields():
    config = CartridgeConfig(num_virtual_tokens=N)
    assert config.num_frozen_tokens == 1 and config.peft_type == peftkit.PeftType.CARTRIDGE and config.is_prompt_learning
    filled = _model().peft_config["default"]
    # llama: 2 key/value heads of 8 -> the cache rows are 16 wide per layer and key/value
    assert (filled.num_layers, filled.token_dim, filled.num_attention_heads, filled.num_transformer_submodules) == (2, 16, 2, 1)
    assert _encoder(_model()).weight.shape == (N, 2 * 2 * 16)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_frozen_tokens": -1}, "num_frozen_tokens"), ({"num_frozen_tokens": N + 1}, "at most"),
    ({"num_frozen_tokens": True}, "num_frozen_tokens"), ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"peft_type": "PREFIX_TUNING"}, "CARTRIDGE"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CartridgeConfig(**{"num_virtual_tokens": N, **kwargs})


# ---------------------------------------------------------------------------------------------- the prefix
def _cache_by_hand(table, layers, heads, head_dim):
    """row j = [K_0, V_0, K_1, V_1, ...] of position j, each heads * head_dim wide."""
    cache = DynamicCache()
    per_layer = table.view(table.shape[0], layers, 2, heads, head_dim)
    for layer in range(layers):
        keys = per_layer[:, layer, 0].transpose(0, 1).unsqueeze(0)  # (1, heads, n, head_dim)
        values = per_layer[:, layer, 1].transpose(0, 1).unsqueeze(0)
        cache.update(keys, values, layer)
    return cache


def test_logits_are_the_base_model_behind_the_cached_prefix():
    model = _model()
    table = _encoder(model).weight.detach()
    ids = lm_inputs()["input_ids"][:1]
    with torch.no_grad():
        actual = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        expected = llama()(input_ids=ids, attention_mask=torch.ones(1, N + ids.shape[1], dtype=torch.long),
                           past_key_values=_cache_by_hand(table, 2, 2, 8)).logits
    assert_close(actual, expected)
    assert_differs(actual, output_of(llama(), {"input_ids": ids}))


def test_a_prefix_from_a_prefill_continues_like_the_base_model():
    """Loading the cache of the base model's prefill on 5 tokens: the adapter on x is the base model on [prefix, x]."""
    model = _model(num_frozen_tokens=2)
    with torch.no_grad():
        prefill = llama()(input_ids=PREFIX_IDS, use_cache=True).past_key_values
    table = initialize_kv_prefix_from_past_key_values(model, past_key_values=prefill)
    assert table.shape == (N, 64)
    assert torch.equal(_encoder(model).weight, table) and torch.equal(_encoder(model).frozen_embedding, table[:2])
    ids = lm_inputs()["input_ids"]
    with torch.no_grad():
        actual = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        expected = llama()(input_ids=torch.cat((PREFIX_IDS[:, :N].expand(2, -1), ids), dim=1)).logits[:, N:]
    assert_close(actual, expected, atol=1e-4)


def test_the_table_layout_of_a_prefill():
    with torch.no_grad():
        cache = llama()(input_ids=PREFIX_IDS, use_cache=True).past_key_values
    table = prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=3)
    layer1 = cache.layers[1]
    # position 2, layer 1 value: columns [(2 * 1 + 1) * 16, (2 * 1 + 2) * 16)
    assert torch.equal(table[2, 48:64], layer1.values[0, :, 2].reshape(-1))
    assert torch.equal(table[2, 32:48], layer1.keys[0, :, 2].reshape(-1))
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    assert torch.equal(prompt_embeddings_from_past_key_values(legacy, num_virtual_tokens=3), table)
    with pytest.raises(ValueError, match="at least 6 cached tokens"):
        prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=6)
    with pytest.raises(ValueError, match="batch 1"):
        prompt_embeddings_from_past_key_values(tuple((k.expand(2, -1, -1, -1), v) for k, v in legacy), num_virtual_tokens=2)
    with pytest.raises(TypeError, match="Unsupported past_key_values"):
        prompt_embeddings_from_past_key_values(object(), num_virtual_tokens=2)


class _PlainTokenizer:
    """A tokenizer without a chat template: `text` -> its characters' codes mod 90, + 2."""

    def __call__(self, text, return_tensors=None, truncation=False, max_length=None):
        ids = [2 + ord(ch) % 90 for ch in text]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": torch.tensor([ids])}


class _NoTemplateTokenizer(_PlainTokenizer):
    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("no chat template")


@pytest.mark.parametrize("tokenizer", [_PlainTokenizer(), _NoTemplateTokenizer()], ids=["plain", "template-fails"])
def test_initialize_from_text_prefills_the_base_model(tokenizer):
    model = _model()
    text = "a system prompt"
    table = initialize_kv_prefix_from_text(model, tokenizer, text=text, max_length=6)
    ids = tokenizer(text)["input_ids"][:, :6]
    with torch.no_grad():
        cache = llama()(input_ids=ids, use_cache=True).past_key_values
    assert torch.equal(table, prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=N))
    assert torch.equal(_encoder(model).weight, table)


def test_initializers_take_prefix_tuning_and_refuse_other_adapters():
    with torch.no_grad():
        prefill = llama()(input_ids=PREFIX_IDS, use_cache=True).past_key_values
    prefix = get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    table = initialize_kv_prefix_from_past_key_values(prefix, past_key_values=prefill)
    assert torch.equal(prefix.base_model.prompt_encoder["default"].embedding.weight, table)
    projected = get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True))
    with pytest.raises(ValueError, match="prefix_projection"):
        initialize_kv_prefix_from_past_key_values(projected, past_key_values=prefill)
    lora = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="must be a CARTRIDGE or PREFIX_TUNING adapter"):
        initialize_kv_prefix_from_past_key_values(lora, past_key_values=prefill)
    with pytest.raises(CheckpointError, match="shape"):
        initialize_kv_prefix_from_past_key_values(_model(), past_key_values=prefill, num_virtual_tokens=3)


# ---------------------------------------------------------------------------------------------- training / saving
def test_the_attention_sink_stays_frozen_while_the_rest_trains():
    model = _model(num_frozen_tokens=2)
    encoder = _encoder(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.prompt_encoder.default.trainable_embedding"}
    assert model.get_nb_trainable_parameters()[0] == (N - 2) * 64
    frozen = encoder.frozen_embedding.detach().clone()
    before = encoder.trainable_embedding.detach().clone()
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(10):
        loss = model(**lm_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert torch.equal(encoder.frozen_embedding, frozen) and not torch.equal(encoder.trainable_embedding, before)


def test_no_frozen_tokens_trains_the_whole_table():
    model = _model(num_frozen_tokens=0)
    assert _encoder(model).frozen_embedding is None
    assert model.get_nb_trainable_parameters()[0] == N * 64


@pytest.mark.parametrize("make_model,make_inputs,task", [
    (llama, lm_inputs, "CAUSAL_LM"), (t5, seq2seq_inputs, "SEQ_2_SEQ_LM"), (bert_seq_cls, cls_inputs, "SEQ_CLS")])
def test_save_load_roundtrip_splits_the_table_again(tmp_path, make_model, make_inputs, task):
    model = _model(make_model, task, num_frozen_tokens=2)
    inputs = make_inputs()
    expected = output_of(model, inputs)
    assert_differs(expected, output_of(make_model(), inputs))
    model.save_pretrained(tmp_path)
    saved = load_peft_weights(str(tmp_path))["prompt_embeddings"]
    assert torch.equal(saved, _encoder(model).weight.detach())
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(_encoder(loaded).frozen_embedding, saved[:2])
    assert torch.equal(_encoder(loaded).trainable_embedding, saved[2:])
    assert_close(output_of(loaded, inputs), expected, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_disabled_adapter_is_the_base_model_and_merge_is_refused():
    model = _model()
    with model.disable_adapter():
        assert_close(output_of(model, lm_inputs()), output_of(llama(), lm_inputs()))
    with pytest.raises(peftkit.AdapterStateError):
        model.merge_adapter()


def test_generate_equals_greedy_by_hand():
    check_generate_equals_greedy(_model(), torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]), max_new_tokens=4)


# ---------------------------------------------------------------------------------------------- composition
def test_compose_concatenates_the_tables(tmp_path):
    first, second = _model(), _model(num_frozen_tokens=0)
    with torch.no_grad():
        second.base_model.prompt_encoder["default"].trainable_embedding.mul_(-0.5)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    compose_cartridge_adapters([tmp_path / "a", str(tmp_path / "b")], output_path=tmp_path / "ab")
    config = peftkit.PeftConfig.from_pretrained(str(tmp_path / "ab"))
    assert (config.num_virtual_tokens, config.num_frozen_tokens) == (2 * N, 1)
    table = load_peft_weights(str(tmp_path / "ab"))["prompt_embeddings"]
    assert torch.equal(table, torch.cat((_encoder(first).weight, _encoder(second).weight)).detach())
    composed = PeftModel.from_pretrained(llama(), tmp_path / "ab")
    ids = lm_inputs()["input_ids"]
    with torch.no_grad():
        out = composed(input_ids=ids[:1]).logits
        by_hand = llama()(input_ids=ids[:1], attention_mask=torch.ones(1, 2 * N + 7, dtype=torch.long),
                          past_key_values=_cache_by_hand(table, 2, 2, 8)).logits
    assert_close(out, by_hand)
    compose_cartridge_adapters([tmp_path / "a", tmp_path / "b"], output_path=tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()


def test_compose_refuses_bad_inputs(tmp_path):
    _model().save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="at least 2"):
        compose_cartridge_adapters([tmp_path / "a"], output_path=tmp_path / "out")
    get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="not a CARTRIDGE adapter"):
        compose_cartridge_adapters([tmp_path / "a", tmp_path / "p"], output_path=tmp_path / "out")
    _model(t5, "SEQ_2_SEQ_LM").save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match="Incompatible CARTRIDGE configs"):
        compose_cartridge_adapters([tmp_path / "a", tmp_path / "t5"], output_path=tmp_path / "out")
    assert not (tmp_path / "out").exists()
