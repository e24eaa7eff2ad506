"""Inference and model-handling times for LoRA, peftkit next to peft (when installed).

    .venv/bin/python bench/bench_inference.py [--threads 2] [--repeats 5] [--json bench/inference.json]

Rows: unmerged vs merged forward (no grad, the training batch of `workloads.py`), DoRA unmerged
forward (eval, its norm cached), `get_peft_model` on a 32-layer model, `merge_and_unload`, and
`save_pretrained` / `from_pretrained` of the adapter. Each figure is the median of `--repeats`
runs in milliseconds. A benchmark, run by hand; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workloads import lora_kwargs, make_batch, make_model  # noqa: E402


def median_ms(action: Callable[[], Any], repeats: int, setup: Callable[[], Any] = lambda: None,
              warmup: bool = True) -> float:
    if warmup:
        setup()
        action()
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def library_rows(lib_name: str, repeats: int) -> dict[str, float]:
    lib = importlib.import_module(lib_name)
    ids = make_batch()
    rows: dict[str, float] = {}

    model = lib.get_peft_model(make_model(), lib.LoraConfig(**lora_kwargs(0.05, init_lora_weights=False))).eval()
    with torch.no_grad():
        rows["forward unmerged"] = median_ms(lambda: model(input_ids=ids), repeats)
        model.merge_adapter()
        rows["forward merged"] = median_ms(lambda: model(input_ids=ids), repeats)
        model.unmerge_adapter()
    dora = lib.get_peft_model(make_model(), lib.LoraConfig(**lora_kwargs(0.0, use_dora=True))).eval()
    with torch.no_grad():
        rows["forward DoRA unmerged"] = median_ms(lambda: dora(input_ids=ids), repeats)

    big = make_model(layers=32)
    config = lib.LoraConfig(**lora_kwargs(0.05))
    rows["get_peft_model 32 layers"] = median_ms(lambda: lib.get_peft_model(big, config).unload(), repeats,
                                                 warmup=False)

    holder: dict[str, Any] = {}
    rows["merge_and_unload"] = median_ms(
        lambda: holder["m"].merge_and_unload(), repeats,
        setup=lambda: holder.update(m=lib.get_peft_model(make_model(), lib.LoraConfig(**lora_kwargs(0.05)))))

    with tempfile.TemporaryDirectory() as directory:
        rows["save_pretrained"] = median_ms(lambda: model.save_pretrained(directory), repeats)
        base = make_model()
        rows["from_pretrained"] = median_ms(
            lambda: lib.PeftModel.from_pretrained(base, directory).unload(), repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "inference.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libs = ["peftkit"] + (["peft"] if importlib.util.find_spec("peft") else [])
    results = {lib: library_rows(lib, args.repeats) for lib in libs}
    print("| operation | peftkit ms | peft ms | peftkit / peft |\n|---|---:|---:|---:|")
    for name, ours in results["peftkit"].items():
        theirs = results.get("peft", {}).get(name)
        ratio = f"{ours / theirs:.2f}" if theirs else "-"
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ratio} |" if theirs else f"| {name} | {ours:.1f} | - | - |")
    with open(args.json, "w") as handle:
        json.dump({"settings": vars(args), "load": os.getloadavg()[0], "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
