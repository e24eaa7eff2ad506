"""Reading training data for the CLI: files in, rows of one known format out.

Files: `.jsonl`, `.json` (an array of objects, an object holding one such array, or JSON lines),
`.csv`, `.tsv`, `.parquet`, and folders written by `datasets.Dataset.save_to_disk` (a
`DatasetDict` gives its `train` split, and its `validation` / `test` split for eval).

Row formats, found from the first row's fields (every row must have them):

    seq-cls     text, label               labels integers, or strings mapped to ids in sorted order
    causal-lm   messages                  [{"role", "content"}, ...]      rendered with the chat template
                conversations             ShareGPT: [{"from": human|gpt|system, "value"}, ...]
                instruction, output       Alpaca (+ optional input, system)
                prompt, completion
                text

Chat-like rows (messages, conversations, Alpaca) become `{"messages": [...]}`; Alpaca rows keep a
`"format": "alpaca"` mark so that a tokenizer without a chat template can fall back to the Alpaca
prompt text (`tokenize.py`).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CliError


@dataclass(frozen=True)
class Fields:
    """Column names in the data file."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a data file or `save_to_disk` folder as dicts (the `train` split of a DatasetDict)."""
    return read_splits(path)[0]


def read_splits(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, eval rows): eval rows only from a DatasetDict folder with a validation/test split."""
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    if not os.path.isfile(path):
        raise CliError(f"data file not found: {path}")
    if path.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ","))
    elif path.endswith(".parquet"):
        rows = _read_parquet(path)
    else:
        rows = _read_json(path)
    if not rows:
        raise CliError(f"data file {path} has no rows")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise CliError(f"{path}: row {bad + 1} is a {type(rows[bad]).__name__}, not an object of fields")
    return rows, []


def _read_json(path: str) -> list[Any]:
    """A JSON array (or an object with one array value), else JSON lines with line numbers in errors."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        return list(data)
    if stripped.startswith("{") and path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines in a .json file
        if isinstance(data, dict):
            arrays = [value for value in data.values() if isinstance(value, list)]
            if len(arrays) != 1:
                raise CliError(f"{path}: a JSON object must hold exactly one array of rows (found {len(arrays)})")
            return arrays[0]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CliError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return rows


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CliError("reading Parquet files and dataset folders needs the `datasets` package (pip install datasets)") from exc
    return datasets


def _read_parquet(path: str) -> list[dict[str, Any]]:
    return _datasets().Dataset.from_parquet(path).to_list()


def _read_saved_dataset(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise CliError(f"{path} is a folder but not one written by datasets' save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise CliError(f"{path}: the DatasetDict has no 'train' split (splits: {', '.join(loaded)})")
        held_out = next((loaded[name] for name in ("validation", "test") if name in loaded), None)
        return loaded["train"].to_list(), held_out.to_list() if held_out is not None else []
    return loaded.to_list(), []


def normalise_rows(rows: list[dict[str, Any]], task: str, fields: Fields, path: str) -> list[dict[str, Any]]:
    """Check the fields and return rows in one of the shapes of the module docstring."""
    first = rows[0]
    if task == "seq-cls":
        for name in (fields.text, fields.label):
            if name not in first:
                raise CliError(f"{path}: no field {name!r} (found {sorted(first)}); use --text-field/--label-field")
        return [{"text": str(_field(row, fields.text, path, i)), "label": _field(row, fields.label, path, i)}
                for i, row in enumerate(rows)]
    kind = data_format(first, fields)
    if kind is None:
        raise CliError(
            f"{path}: causal-lm rows need 'messages', 'conversations', 'instruction' + 'output', "
            f"{fields.prompt!r} + {fields.completion!r} or {fields.text!r} fields (found {sorted(first)})"
        )
    return [_normalise(row, kind, fields, path, index) for index, row in enumerate(rows)]


def data_format(row: dict[str, Any], fields: Fields = Fields()) -> str | None:
    """Which format a row is in: messages, sharegpt, alpaca, prompt-completion, text, labelled, or None."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if fields.prompt in row and fields.completion in row:
        return "prompt-completion"
    if fields.text in row and fields.label in row:
        return "labelled"
    if fields.text in row:
        return "text"
    return None


def _field(row: dict[str, Any], name: str, path: str, index: int) -> Any:
    if name not in row or row[name] is None:
        raise CliError(f"{path}: row {index + 1} has no {name!r} field (the first row has it)")
    return row[name]


def _normalise(row: dict[str, Any], kind: str, fields: Fields, path: str, index: int) -> dict[str, Any]:
    if kind == "messages":
        return {"messages": _messages(_field(row, "messages", path, index), "role", "content", path, index)}
    if kind == "sharegpt":
        return {"messages": _messages(_field(row, "conversations", path, index), "from", "value", path, index)}
    if kind == "alpaca":
        user = str(_field(row, "instruction", path, index))
        if row.get("input"):
            user = f"{user}\n\n{row['input']}"
        messages = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": str(_field(row, "output", path, index))}]
        return {"messages": messages, "format": "alpaca"}
    if kind == "prompt-completion":
        return {"prompt": str(_field(row, fields.prompt, path, index)),
                "completion": str(_field(row, fields.completion, path, index))}
    return {"text": str(_field(row, fields.text, path, index))}


def _messages(turns: Any, role_key: str, content_key: str, path: str, index: int) -> list[dict[str, str]]:
    """Turns as `{"role", "content"}` with roles user / assistant / system / tool."""
    if not isinstance(turns, list) or not turns:
        raise CliError(f"{path}: row {index + 1}: the conversation must be a non-empty list of turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise CliError(f"{path}: row {index + 1}: each turn needs {role_key!r} and {content_key!r} (got {turn!r:.80})")
        role = SHAREGPT_ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise CliError(f"{path}: row {index + 1}: unknown role {turn[role_key]!r}; use one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": str(turn[content_key])})
    if not any(turn["role"] == "assistant" for turn in out):
        raise CliError(f"{path}: row {index + 1}: the conversation has no assistant turn to learn from")
    return out


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
