"""Mixed-adapter batches: every row with its own LoRA adapter, 1 / 4 / 32 distinct adapters.

    .venv/bin/python bench/bench_mixed_batch.py [--threads 2] [--repeats 5] [--json bench/mixed_batch.json]

32 rows; prefill of 64 tokens and one decode token (with the prefill's KV cache), no grad, eval.
"1 adapter (plain)" is the same adapter active the usual way (no `adapter_names`), the reference
for the ratio column. peft's figures for the same calls when it is installed. A benchmark, run by
hand; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_inference import median_ms  # noqa: E402
from workloads import lora_kwargs, make_model  # noqa: E402

ROWS, PREFILL = 32, 64


def library_rows(lib_name: str, repeats: int) -> dict[str, dict[str, float]]:
    lib = importlib.import_module(lib_name)
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model(), lib.LoraConfig(**lora_kwargs(0.0, init_lora_weights=False)), "a0")
    for index in range(1, 32):
        model.add_adapter(f"a{index}", lib.LoraConfig(**lora_kwargs(0.0, init_lora_weights=False)))
    model.eval()
    model.config.use_cache = True
    ids = torch.randint(0, 8000, (ROWS, PREFILL), generator=torch.Generator().manual_seed(0))
    next_ids = ids[:, -1:]
    results: dict[str, dict[str, float]] = {}
    cases = {"1 adapter (plain)": None, "1 adapter": 1, "4 adapters": 4, "32 adapters": 32}
    with torch.no_grad():
        for label, distinct in cases.items():
            extra = {} if distinct is None else {"adapter_names": [f"a{i % distinct}" for i in range(ROWS)]}
            prefill = median_ms(lambda: model(input_ids=ids, **extra), repeats)
            cache = model(input_ids=ids, use_cache=True, **extra).past_key_values

            def decode() -> None:
                model(input_ids=next_ids, past_key_values=cache, use_cache=True, **extra)
                cache.crop(-1)  # drop the decoded token, so every timed decode sees the same cache

            results[label] = {"prefill_ms": prefill, "decode_ms": median_ms(decode, repeats)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "mixed_batch.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libs = ["peftkit"] + (["peft"] if importlib.util.find_spec("peft") else [])
    results = {lib: library_rows(lib, args.repeats) for lib in libs}
    print("| batch of 32 rows | lib | prefill ms | decode ms | decode / plain |\n|---|---|---:|---:|---:|")
    for lib, rows in results.items():
        plain = rows["1 adapter (plain)"]["decode_ms"]
        for label, row in rows.items():
            print(f"| {label} | {lib} | {row['prefill_ms']:.1f} | {row['decode_ms']:.1f} | {row['decode_ms'] / plain:.2f} |")
    with open(args.json, "w") as handle:
        json.dump({"settings": vars(args), "load": os.getloadavg()[0], "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
