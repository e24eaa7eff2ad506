"""Ratio of a row's training step to the frozen bound, both timed in one process, step by step.

    .venv/bin/python bench/paired.py ROW [ROW ...] [--lib peftkit|peft] [--pairs 10] [--threads 2]

`run_all.py` times every row in its own process, so a ratio there divides two figures taken
minutes apart, and this machine's speed drifts over minutes. Here the frozen model and the row's
model live in one process and their steps alternate (frozen, row, frozen, row, ...), so a drift
hits both alike; the ratio printed is the median over pairs of row / frozen. Peak memory is not
measured (two models share the process). Prints one JSON line per row. A benchmark; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workloads import ROWS, build, make_batch, make_step  # noqa: E402


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1000


def paired_ratio(frozen: Callable[[], None], step: Callable[[], None], pairs: int, warmup: int) -> dict[str, float]:
    """Alternate `frozen` and `step` (`warmup` pairs untimed); the median, min and max of step / frozen."""
    for _ in range(warmup):
        frozen(), step()
    times = [(timed(frozen), timed(step)) for _ in range(pairs)]
    ratios = [row_ms / frozen_ms for frozen_ms, row_ms in times]
    return {"ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "frozen_ms": round(statistics.median(t[0] for t in times), 1),
            "row_ms": round(statistics.median(t[1] for t in times), 1)}


def pairing_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--pairs, --warmup, --threads: the options shared with `floors.py`."""
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def frozen_bound(lib: str, threads: int) -> tuple[Callable[[], None], torch.Tensor]:
    """(the frozen model's step, the batch) after setting the thread count."""
    torch.set_num_threads(threads)
    ids = make_batch()
    frozen_model, _ = build("frozen", lib)
    return make_step(frozen_model.train(), [], ids), ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", nargs="+", choices=[row for row in ROWS if row != "frozen"])
    parser.add_argument("--lib", default="peftkit", choices=["peftkit", "peft"])
    args = pairing_options(parser).parse_args()
    frozen, ids = frozen_bound(args.lib, args.threads)
    for row in args.rows:
        model, params = build(row, args.lib)
        step = make_step(model.train(), params, ids)
        result = paired_ratio(frozen, step, args.pairs, args.warmup)
        print(json.dumps({"row": row, "lib": args.lib, **result}), flush=True)
        del model, params, step


if __name__ == "__main__":
    main()
