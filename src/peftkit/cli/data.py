"""Reading training data for the CLI and turning it into tokenized batches.

causal-lm rows: `{"text": ...}` or `{"prompt": ..., "completion": ...}` (JSONL).
seq-cls rows: `text,label` (CSV or JSONL); labels may be integers or strings (mapped to ids in
sorted order).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import CliError


@dataclass(frozen=True)
class Fields:
    """Column names in the data file."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a `.jsonl`/`.json` or `.csv`/`.tsv` file as dicts."""
    if not os.path.isfile(path):
        raise CliError(f"data file not found: {path}")
    if path.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ","))
    else:
        rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise CliError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    if not rows:
        raise CliError(f"data file {path} has no rows")
    return rows


def normalise_rows(rows: list[dict[str, Any]], task: str, fields: Fields, path: str) -> list[dict[str, Any]]:
    """Check the fields and return rows as `{"text", "label"}` or `{"prompt", "completion"}`/`{"text"}`."""
    first = rows[0]
    if task == "seq-cls":
        for name in (fields.text, fields.label):
            if name not in first:
                raise CliError(f"{path}: no field {name!r} (found {sorted(first)}); use --text-field/--label-field")
        return [{"text": str(row[fields.text]), "label": row[fields.label]} for row in rows]
    if fields.prompt in first and fields.completion in first:
        return [{"prompt": str(row[fields.prompt]), "completion": str(row[fields.completion])} for row in rows]
    if fields.text in first:
        return [{"text": str(row[fields.text])} for row in rows]
    raise CliError(
        f"{path}: causal-lm data needs a {fields.text!r} field or {fields.prompt!r} + {fields.completion!r} fields "
        f"(found {sorted(first)})"
    )


def label_ids(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Map labels to 0..K-1: integer labels keep their value, others are sorted; returns (rows, names)."""
    raw = [row["label"] for row in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        values = sorted({int(v) for v in raw})
        if values[0] < 0:
            raise CliError(f"labels must be >= 0, found {values[0]}")
        names = [str(v) for v in range(values[-1] + 1)]
        return [{**row, "label": int(row["label"])} for row in rows], names
    names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(names)}
    return [{**row, "label": index[str(row["label"])]} for row in rows], names


def split_rows(
    rows: Sequence[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with `seed`; the last `eval_fraction` of rows (at least one) is the eval split."""
    if not 0.0 <= eval_fraction < 1.0:
        raise CliError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 else max(1, round(len(order) * eval_fraction))
    if n_eval >= len(order):
        raise CliError(f"not enough rows ({len(order)}) for an eval split of {eval_fraction}")
    return order[n_eval:], order[:n_eval]


def encode_batch(
    rows: Sequence[dict[str, Any]], tokenizer: Any, task: str, max_length: int, completion_only: bool
) -> dict[str, torch.Tensor]:
    """Tokenize one batch with labels (class ids, or token ids with -100 on padding/prompt)."""
    if task == "seq-cls":
        enc = tokenizer(
            [r["text"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(enc)
    return _encode_causal(rows, tokenizer, max_length, completion_only)


def _encode_causal(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, completion_only: bool
) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels mask padding and, with `completion_only`, the prompt tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sequences, prompt_lengths = [], []
    for row in rows:
        if "prompt" in row:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]
            ids = (prompt + completion)[:max_length]
            prompt_lengths.append(len(prompt) if completion_only else 0)
        else:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:max_length]
            prompt_lengths.append(0)
        sequences.append(ids or [pad_id])
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    task: str,
    batch_size: int,
    max_length: int,
    completion_only: bool = False,
    shuffle_seed: Optional[int] = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield encoded batches; shuffled when `shuffle_seed` is given."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        yield encode_batch(chunk, tokenizer, task, max_length, completion_only)
