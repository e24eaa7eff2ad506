"""torch.compile on a LoRA model: graph breaks and the speed-up of a training step over eager.

    .venv/bin/python bench/bench_compile.py [--lib peftkit|peft] [--threads 2] [--steps 5] [--dropout 0.05]
                                            [--backend inductor] [--frozen]

`--frozen` times the frozen-base bound instead (no adapter): what the compiler does for the base
model alone, the reference for the adapter's speed-up.

Graph breaks are counted with `torch._dynamo.explain` on the forward + loss; the speed-up is the
median eager step over the median compiled step (forward + backward + AdamW over the adapter),
after the compiled model's warm-up (compile time is reported separately). Prints one JSON line.
A benchmark, run by hand; inductor compilation on CPU takes minutes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workloads import build, lora_kwargs, make_batch, make_model, make_step, time_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", default="peftkit", choices=["peftkit", "peft"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--frozen", action="store_true", help="time the frozen base (the bound) instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.frozen:
        model, params = build("frozen", args.lib)
    else:
        lib = importlib.import_module(args.lib)
        model = lib.get_peft_model(make_model(), lib.LoraConfig(**lora_kwargs(args.dropout)))
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    ids = make_batch()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    eager = statistics.median(time_steps(make_step(model, params, ids), args.steps, 1))
    compiled_model = torch.compile(model, backend=args.backend)
    step = make_step(compiled_model, params, ids)
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    compiled = statistics.median(time_steps(step, args.steps, 1))
    print(json.dumps({"lib": "frozen" if args.frozen else args.lib, "dropout": args.dropout, "backend": args.backend,
                      "graph_breaks": explanation.graph_break_count, "graphs": explanation.graph_count,
                      "break_reasons": [str(r.reason)[:200] for r in explanation.break_reasons],
                      "eager_ms": eager, "compiled_ms": compiled, "speedup": eager / compiled,
                      "compile_s": compile_s, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
