"""`peftkit train` on transformers' Trainer: data formats, options, failure modes, resume; `chat`, `merge`, `compare`.

Runs are in-process (`main([...])`) on the 2-layer models of `cli_helpers`, a few steps each.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from peftkit.cli import compare as compare_module
from peftkit.cli.data import Fields, normalise_rows, read_rows, read_splits
from peftkit.cli.errors import CliError
from peftkit.cli.features import IGNORE, encode_example, encode_rows, pack
from peftkit.cli.main import main
from peftkit.cli.methods import parse_value
from peftkit.cli.options import resolve_settings
from tests.cli_helpers import save_tiny_models, write_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: A minimal chat template: role tags, [SEP] (the tiny tokenizer's EOS) after assistant turns.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% if m['role'] == 'assistant' %} [SEP]{% endif %}\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_train")
    paths = {**save_tiny_models(root), **write_data(root), "root": root}
    alpaca = [{"instruction": f"add {i} and one", "input": "" if i % 2 else "numbers", "output": f"it is {i + 1}"}
              for i in range(12)]
    (root / "alpaca.json").write_text(json.dumps(alpaca))  # a JSON array (crashed the old CLI)
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(12)]
    (root / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat))
    share = [{"conversations": [{"from": "human", "value": f"hey {i}"}, {"from": "gpt", "value": f"yo {i}"}]} for i in range(12)]
    (root / "share.jsonl").write_text("".join(json.dumps(row) + "\n" for row in share))
    (root / "template.jinja").write_text(TEMPLATE)
    import datasets

    datasets.Dataset.from_list(alpaca).to_parquet(str(root / "alpaca.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca), "validation": datasets.Dataset.from_list(alpaca[:3])}
                         ).save_to_disk(str(root / "alpaca_ds"))
    paths.update({name: root / file for name, file in [("alpaca", "alpaca.json"), ("chat", "chat.jsonl"),
                  ("share", "share.jsonl"), ("template", "template.jinja"), ("parquet", "alpaca.parquet"),
                  ("disk", "alpaca_ds")]})
    return paths


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from peftkit.cli.modeling import load_tokenizer

    return load_tokenizer(str(tiny["llama"]))


def train(tiny, out, *args) -> int:
    return main(["train", "--model", str(tiny["llama"]), "--out", str(out), "--batch-size", "4", "--logging-steps", "1",
                 *map(str, args)])


# ---------------------------------------------------------------------- reading each format
def test_each_file_format_reads_the_same_rows(tiny):
    rows = read_rows(str(tiny["alpaca"]))
    assert rows == read_rows(str(tiny["parquet"])) == read_rows(str(tiny["disk"]))
    assert len(rows) == 12 and rows[0]["instruction"] == "add 0 and one"
    train_rows, held_out = read_splits(str(tiny["disk"]))
    assert len(train_rows) == 12 and held_out == rows[:3]  # the DatasetDict's validation split


def test_rows_are_normalised_per_format(tiny):
    alpaca = normalise_rows(read_rows(str(tiny["alpaca"])), "causal-lm", Fields(), "a")
    assert alpaca[0] == {"messages": [{"role": "user", "content": "add 0 and one\n\nnumbers"},
                                      {"role": "assistant", "content": "it is 1"}], "format": "alpaca"}
    share = normalise_rows(read_rows(str(tiny["share"])), "causal-lm", Fields(), "s")
    assert share[0]["messages"] == [{"role": "user", "content": "hey 0"}, {"role": "assistant", "content": "yo 0"}]
    sft = normalise_rows(read_rows(str(tiny["sft"])), "causal-lm", Fields(), "p")
    assert set(sft[0]) == {"prompt", "completion"}
    with pytest.raises(CliError, match="unknown role 'robot'"):
        normalise_rows([{"conversations": [{"from": "robot", "value": "x"}]}], "causal-lm", Fields(), "f")
    with pytest.raises(CliError, match="no assistant turn"):
        normalise_rows([{"messages": [{"role": "user", "content": "x"}]}], "causal-lm", Fields(), "f")


def test_json_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"}, 3]')
    with pytest.raises(CliError, match="row 2 is a int"):
        read_rows(str(bad))
    bad.write_text("[{")
    with pytest.raises(CliError, match="not valid JSON"):
        read_rows(str(bad))


# ---------------------------------------------------------------------- features
def test_text_rows_end_with_eos(tokenizer):
    example = encode_example({"text": "the cat"}, tokenizer, "causal-lm", 64, False)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["labels"] == example["input_ids"]


def test_chat_completion_only_learns_the_assistant_turns(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = TEMPLATE
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}]}
    example = encode_example(row, tokenizer, "causal-lm", 128, True)
    learned = tokenizer.decode([t for t in example["labels"] if t != IGNORE])
    assert "hello there" in learned and "bye" in learned and "hi" not in learned and "again" not in learned
    assert tokenizer.eos_token_id in [t for t in example["labels"] if t != IGNORE]  # the model learns to stop


def test_chat_rows_need_a_template_but_alpaca_falls_back(tokenizer, tiny):
    chat = normalise_rows(read_rows(str(tiny["chat"])), "causal-lm", Fields(), "c")
    with pytest.raises(CliError, match="no chat template.*--chat-template"):
        encode_example(chat[0], tokenizer, "causal-lm", 64, True)
    alpaca = normalise_rows(read_rows(str(tiny["alpaca"])), "causal-lm", Fields(), "a")
    example = encode_example(alpaca[0], tokenizer, "causal-lm", 128, True)
    text = tokenizer.decode(example["input_ids"])
    assert "instruction : add 0 and one" in text.lower() and tokenizer.decode([t for t in example["labels"] if t != IGNORE]).startswith("it is 1")


def test_truncated_completions_are_dropped_and_counted(tokenizer):
    rows = [{"prompt": "a long prompt " * 10, "completion": " x"}, {"prompt": "short", "completion": " y"}]
    encoded = encode_rows(rows, tokenizer, "causal-lm", 8, completion_only=True)
    assert encoded.dropped == 1 and len(encoded.examples) == 1
    assert any(label != IGNORE for label in encoded.examples[0]["labels"])
    assert encode_rows(rows, tokenizer, "causal-lm", 8, completion_only=False).dropped == 0


def test_packing_keeps_every_token_and_label():
    examples = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    packed = pack(examples, 2)
    assert [p["input_ids"] for p in packed] == [[1, 2], [3, 4], [5]]
    assert [label for p in packed for label in p["labels"]] == [IGNORE, 2, 3, 4, 5]


# ---------------------------------------------------------------------- options
def _flags(**given):
    return {"config": None, **given}


def test_yaml_with_hf_names_numbers_and_method_fields(tmp_path, tiny):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny['llama']}\ndata: {tiny['lm']}\nlearning_rate: 1e-4\nnum_train_epochs: 2\n"
                      "per_device_train_batch_size: 2\nreport_to: none\nlr_scheduler_type: constant\n"
                      "eval_steps: 3\nr: 2\nlora_alpha: 4\n")
    settings = resolve_settings(_flags(config=str(config)), [])
    assert settings.lr == 1e-4 and isinstance(settings.lr, float)  # PyYAML reads 1e-4 as a string
    assert settings.epochs == 2.0 and settings.batch_size == 2 and settings.report_to == ["none"]
    assert settings.training_args == {"eval_steps": 3}  # any other TrainingArguments field
    assert settings.method_args == {"r": 2, "lora_alpha": 4}
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(CliError, match="unknown option 'learning_rat'.*did you mean learning_rate"):
        resolve_settings(_flags(config=str(config)), [])
    config.write_text("learning_rate: fast\n")
    with pytest.raises(CliError, match="learning_rate must be a number"):
        resolve_settings(_flags(config=str(config)), [])


@pytest.mark.parametrize("flags, message", [
    ({"epochs": 0.0}, "--epochs must be > 0"), ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"max_steps": 0}, "--max-steps 0 trains nothing"), ({"lr": 0.0}, "--lr must be > 0"),
    ({"bf16": True, "fp16": True}, "exclude each other"), ({"grad_accum": 0}, "--grad-accum must be at least 1"),
])
def test_settings_that_train_nothing_are_refused(flags, message):
    with pytest.raises(CliError, match=message):
        resolve_settings(_flags(model="m", data="d", **flags), [])


def test_all_linear_is_a_keyword_not_a_module_list():
    assert parse_value("target_modules", "all-linear") == "all-linear"
    assert parse_value("target_modules", "q_proj,v_proj") == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------- runs
def test_alpaca_json_trains_on_trainer_with_card_tokenizer_and_strict_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "a"
    assert train(tiny, out, "--data", tiny["alpaca"], "--epochs", "2", "--lr", "0.01", "--completion-only", "--verify",
                 "--eval-fraction", "0.25", "--target-modules", "all-linear", "--r", "2") == 0
    printed = capsys.readouterr().out
    assert "task causal-lm" in printed and "verify OK" in printed  # task found from the data
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics"))
    assert metrics["train_steps"] == 6 and len(metrics["train_loss"]) == 2 and metrics["reload_matches"] is True
    config = json.loads((out / "adapter_config.json").read_text())
    assert len(config["target_modules"]) > 2 and os.path.isabs(config["base_model_name_or_path"])
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "## Training with `peftkit train`" in card and "train loss per epoch" in card
    assert (out / "tokenizer_config.json").is_file()
    state = json.loads(next((out / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert max(rates) > 0 and len(set(rates)) > 1  # Trainer's warmup + cosine schedule ran


def test_chat_data_with_a_template_file_and_sharegpt(tiny, tmp_path):
    assert train(tiny, tmp_path / "c", "--data", tiny["chat"], "--chat-template", tiny["template"], "--completion-only",
                 "--max-steps", "2") == 0
    assert train(tiny, tmp_path / "s", "--data", tiny["share"], "--chat-template", tiny["template"], "--max-steps", "1",
                 "--packing", "--max-length", "16") == 0
    assert (tmp_path / "s" / "chat_template.jinja").is_file() or "chat_template" in (tmp_path / "s" / "tokenizer_config.json").read_text()


def test_chat_data_without_a_template_is_refused_before_training(tiny, tmp_path, capsys):
    assert train(tiny, tmp_path / "x", "--data", tiny["chat"], "--max-steps", "1") == 2
    assert "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_parquet_and_dataset_folder_with_its_validation_split(tiny, tmp_path, capsys):
    assert train(tiny, tmp_path / "p", "--data", tiny["parquet"], "--max-steps", "1") == 0
    assert train(tiny, tmp_path / "d", "--data", tiny["disk"], "--max-steps", "1") == 0
    assert "12 train / 3 eval" in capsys.readouterr().out


def test_nan_loss_stops_the_run_and_saves_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "nan"
    assert train(tiny, out, "--data", tiny["lm"], "--lr", "1e38", "--max-steps", "4", "--lr-scheduler-type", "constant",
                 "--warmup", "0") == 1
    err = capsys.readouterr().err
    assert "training loss became nan" in err.lower() or "training loss became inf" in err.lower()
    assert not out.exists()


def test_every_completion_truncated_away_is_refused(tiny, tmp_path, capsys):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "word " * 40, "completion": " end"}) + "\n" for _ in range(6)))
    assert train(tiny, tmp_path / "t", "--data", long_prompts, "--completion-only", "--max-length", "8") == 2
    assert "completion lies beyond --max-length 8" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_verify_fails_when_there_is_nothing_to_check(tiny, tmp_path, capsys):
    assert train(tiny, tmp_path / "v", "--data", tiny["lm"], "--max-steps", "1", "--eval-fraction", "0", "--verify") == 1
    assert "nothing to verify" in capsys.readouterr().out


def test_resume_continues_from_the_newest_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    common = ["--data", tiny["lm"], "--save-strategy", "steps", "--save-steps", "2", "--lr-scheduler-type", "constant"]
    assert train(tiny, out, *common, "--max-steps", "2") == 0
    assert train(tiny, out, *common, "--max-steps", "4", "--resume") == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "checkpoint-2" in printed
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 4
    assert train(tiny, tmp_path / "r2", "--data", tiny["lm"], "--resume", tmp_path / "none") == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_bf16_and_gradient_checkpointing_on_cpu(tiny, tmp_path):
    out = tmp_path / "bf16"
    assert train(tiny, out, "--data", tiny["sft"], "--bf16", "--gradient-checkpointing", "--max-steps", "3",
                 "--lr", "0.01", "--verify", "--completion-only", "--eval-fraction", "0.25") in (0, 1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reload_matches"] is True and metrics["train_steps"] == 3


def test_4bit_base_trains_and_reloads(tiny, tmp_path):
    out = tmp_path / "q"
    assert train(tiny, out, "--data", tiny["lm"], "--load-in-4bit", "--max-steps", "2", "--verify", "--lr", "0.01") in (0, 1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reload_matches"] is True
    assert "4-bit base" in (out / "README.md").read_text()


def test_seq_cls_labels_survive_merge_from_another_directory(tiny, tmp_path, monkeypatch):
    from transformers import AutoConfig

    out = tmp_path / "cls"
    assert main(["train", "--model", os.path.relpath(tiny["bert"]), "--data", str(tiny["cls"]), "--out", str(out),
                 "--max-steps", "2", "--r", "2", "--target-modules", "query,value"]) == 0
    monkeypatch.chdir(tmp_path)  # the base was given relative to another directory
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "merged").id2label == {0: "neg", 1: "pos"}


def test_chat_and_generate_stream_replies(tiny, tmp_path, capsys):
    out = tmp_path / "chat"
    assert train(tiny, out, "--data", tiny["lm"], "--max-steps", "1") == 0
    capsys.readouterr()
    from peftkit.cli import chat
    from peftkit.cli.main import build_parser

    args = build_parser().parse_args(["chat", "--adapter", str(out), "--max-new-tokens", "3"])
    assert chat.run_chat(args, [], stdin=io.StringIO("hello\n/reset\nagain\n")) == 0
    printed = capsys.readouterr().out
    assert printed.count("assistant> ") == 2 and len(printed.replace("assistant> ", "").strip()) > 0
    assert main(["generate", "--adapter", str(out), "--prompt", "hi", "--max-new-tokens", "2", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--adapter", str(tmp_path / "none")]) == 2


# ---------------------------------------------------------------------- compare
def test_compare_interleaves_steps_and_runs_adalora(tiny, tmp_path, monkeypatch):
    order = []
    real_step = compare_module._step
    monkeypatch.setattr(compare_module, "_step", lambda run, batch, record: (order.append(run.name), real_step(run, batch, record)))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny["bert"]), "--methods", "lora,adalora,ia3", "--data", str(tiny["cls"]),
                 "--train-steps", "3", "--batch-size", "8", "--out", str(out), "--lora.r", "2", "--no-plot"]) == 0
    assert order == ["lora", "adalora", "ia3", "adalora", "ia3", "lora", "ia3", "lora", "adalora"]
    rows = json.loads((out / "compare.json").read_text())
    assert all("error" not in row and row["step_time_min_ms"] <= row["step_time_ms"] for row in rows)
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]


def test_compare_chart_shows_failed_methods_and_baseline(tiny, tmp_path):
    out = tmp_path / "cmp2"
    assert main(["compare", "--model", str(tiny["bert"]), "--methods", "lora,prefix", "--data", str(tiny["cls"]),
                 "--train-steps", "1", "--batch-size", "8", "--out", str(out), "--prefix.num-virtual-tokens", "100000000"]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert "error" in rows[1] and "error" not in rows[0]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CliError, match="not one of --methods"):
        compare_module.parse_per_method_flags(["--ia3.r", "2"], ["lora"])
