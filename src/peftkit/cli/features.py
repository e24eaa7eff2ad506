"""Rows (see `data.py`) -> token features for training, and padded batches.

causal-lm, one example per row (`input_ids`, `labels`; labels -100 where no loss is taken):

    text                 [BOS] text [EOS]                       loss on every token
    prompt, completion   [BOS] prompt completion [EOS]          with completion_only: loss on completion [EOS]
    messages             the tokenizer's chat template          with completion_only: loss on the assistant turns

The EOS token is appended (unless the text already ends with it) so the model learns to stop. A
chat row is rendered by the template as text; each assistant turn's tokens are the difference
between the conversation rendered up to that turn and the prompt before it
(`add_generation_prompt=True`). Alpaca rows on a tokenizer with no chat template use the Alpaca
prompt text instead; other chat rows need a template (`--chat-template FILE` sets one).

Truncation to `max_length` can cut a completion away entirely; with completion_only such a row
would carry no loss at all (NaN in a batch of them), so it is dropped and counted
(`EncodedRows.dropped`), and a run where every row is dropped is refused.

Packing concatenates the examples and cuts the stream into `max_length` blocks (no padding, every
row of a batch full), keeping each token's label.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import CliError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100


@dataclass
class EncodedRows:
    """The examples of a split and how many rows were dropped because truncation left no loss."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    dropped: int = 0


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _bos(tokenizer: Any) -> list[int]:
    """The BOS id when the tokenizer puts one in front of its texts (Llama does, GPT-2 and BERT do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text)


def _chat_example(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[bool]]:
    """(ids, mask of the assistant tokens) of a chat row."""
    messages = row["messages"]
    if not has_chat_template(tokenizer):
        if row.get("format") != "alpaca":
            raise CliError(
                "the data is chat-formatted (messages / conversations) but the tokenizer has no chat template; "
                "use a chat model's tokenizer or pass --chat-template FILE (a Jinja template)"
            )
        system = [m["content"] for m in messages if m["role"] == "system"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        prompt = "\n\n".join(system + [ALPACA_PROMPT.format(instruction=user)])
        prompt_ids = _bos(tokenizer) + _ids(tokenizer, prompt)
        answer_ids = _with_eos(tokenizer, _ids(tokenizer, answer))
        return prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)
    ids = _render(tokenizer, messages)
    mask = [False] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], generation_prompt=True) if turn else []
        upto = _render(tokenizer, messages[: turn + 1])
        if ids[: len(upto)] != upto or upto[: len(before)] != before:  # a template that is not prefix-stable
            start = len(before) if ids[: len(before)] == before else 0
            mask[start:] = [True] * (len(ids) - start)
            continue
        mask[len(before) : len(upto)] = [True] * (len(upto) - len(before))
    return ids, mask


def encode_example(row: dict[str, Any], tokenizer: Any, task: str, max_length: int, completion_only: bool) -> Optional[dict]:
    """One row's features, or None when completion_only truncation leaves no token to learn."""
    if task == "seq-cls":
        enc = tokenizer(row["text"], truncation=True, max_length=max_length)
        return {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"]), "labels": row["label"]}
    if "messages" in row:
        ids, learn = _chat_example(tokenizer, row)
    elif "prompt" in row:
        prompt = _bos(tokenizer) + _ids(tokenizer, row["prompt"])
        completion = _with_eos(tokenizer, _ids(tokenizer, row["completion"]))
        ids, learn = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    else:
        ids = _with_eos(tokenizer, _bos(tokenizer) + _ids(tokenizer, row["text"]))
        learn = [True] * len(ids)
    ids, learn = ids[:max_length], learn[:max_length]
    if not completion_only:
        learn = [True] * len(ids)
    if not any(learn):
        return None
    return {"input_ids": ids, "labels": [token if keep else IGNORE for token, keep in zip(ids, learn)]}


def encode_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, task: str, max_length: int, completion_only: bool) -> EncodedRows:
    """Every row encoded; rows whose completion truncation removed are counted, not kept."""
    out = EncodedRows()
    for row in rows:
        example = encode_example(row, tokenizer, task, max_length, completion_only)
        if example is None:
            out.dropped += 1
        else:
            out.examples.append(example)
    return out


def pack(examples: Sequence[dict[str, list[int]]], block: int) -> list[dict[str, list[int]]]:
    """The examples end to end, cut into `block`-token rows (the last, shorter remainder kept)."""
    ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    return [{"input_ids": ids[i : i + block], "labels": labels[i : i + block]} for i in range(0, len(ids), block)]


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


class Collator:
    """Pads a list of examples on the right: ids with the pad token, labels with -100, a 0/1 mask."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = pad_id(tokenizer)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        sequence_labels = not isinstance(examples[0]["labels"], list)
        labels = (torch.tensor([e["labels"] for e in examples]) if sequence_labels
                  else torch.full((len(examples), width), IGNORE, dtype=torch.long))
        for i, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[i, :n] = torch.tensor(example["input_ids"])
            attention_mask[i, :n] = 1
            if not sequence_labels:
                labels[i, :n] = torch.tensor(example["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_batch(
    rows: Sequence[dict[str, Any]], tokenizer: Any, task: str, max_length: int, completion_only: bool
) -> dict[str, torch.Tensor]:
    """One padded batch of `rows` (rows left with no loss are kept, with every label -100)."""
    examples = []
    for row in rows:
        example = encode_example(row, tokenizer, task, max_length, completion_only)
        if example is None:
            example = encode_example(row, tokenizer, task, max_length, False)
            example["labels"] = [IGNORE] * len(example["input_ids"])
        examples.append(example)
    return Collator(tokenizer)(examples)


def batches(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    task: str,
    batch_size: int,
    max_length: int,
    completion_only: bool = False,
    shuffle_seed: Optional[int] = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Encoded batches in order, or shuffled when `shuffle_seed` is given."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield encode_batch([rows[i] for i in order[start : start + batch_size]], tokenizer, task, max_length, completion_only)
