"""Training-step table: every row of `workloads.py`, each in its own process, for peftkit and peft.

    .venv/bin/python bench/run_all.py [--rows frozen,lora_p0,...] [--steps 10] [--warmup 2] [--repeat 1]
                                      [--no-peft] [--json bench/results.json]

Columns: median step ms, ratio to the frozen bound (same run), ratio to peft's same row (same run;
only when peft is installed and has the method), trainable parameters, peak RSS of the process.
With `--repeat N` all rows run N rounds and the lowest median per (row, library) is kept (the run
least disturbed by other load). The bound (`frozen`) runs at the start and again at the end of
every round: one frozen figure taken while the machine was slower would skew every ratio, and
this machine's speed drifts over minutes (frozen alone measured 862-1021 ms in one afternoon).
The 1-minute load average is recorded before each process.
A benchmark, run by hand; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from workloads import PEFTKIT_ONLY, ROWS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def run_once(row: str, lib: str, args: argparse.Namespace) -> Optional[dict[str, Any]]:
    load = os.getloadavg()[0]
    command = [sys.executable, os.path.join(HERE, "workloads.py"), row, "--lib", lib, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(f"  {row} [{lib}] failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_before"] = round(load, 2)
    print(f"  {row:<11} [{lib:<7}] {result['step_ms']:8.1f} ms  rss {result['peak_rss_mb']:7.1f} MB  "
          f"load {result['load_before']}", file=sys.stderr, flush=True)
    return result


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}"}
    for name in ("peftkit", "peft"):
        if importlib.util.find_spec(name) is not None:
            found[name] = importlib.import_module(name).__version__
    return found


def table(results: dict[str, dict[str, Any]]) -> str:
    bound = results.get("frozen", {}).get("peftkit", {}).get("step_ms")
    lines = ["| row | step ms | / bound | / peft | peft ms | trainable | peak RSS MB | peft RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, by_lib in results.items():
        ours, theirs = by_lib.get("peftkit"), by_lib.get("peft")
        if ours is None:
            continue
        ratio_bound = f"{ours['step_ms'] / bound:.2f}" if bound else "-"
        ratio_peft = f"{ours['step_ms'] / theirs['step_ms']:.2f}" if theirs else "-"
        peft_ms = f"{theirs['step_ms']:.0f}" if theirs else "-"
        peft_rss = f"{theirs['peak_rss_mb']:.0f}" if theirs else "-"
        lines.append(f"| {row} | {ours['step_ms']:.0f} | {ratio_bound} | {ratio_peft} | {peft_ms} | "
                     f"{ours['trainable']:,} | {ours['peak_rss_mb']:.0f} | {peft_rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    with_peft = not args.no_peft and importlib.util.find_spec("peft") is not None
    results: dict[str, dict[str, Any]] = {}
    jobs = []
    for row in args.rows.split(","):
        results[row] = {}
        for lib in ["peftkit"] if row in ("frozen", "full") else ["peftkit", "peft"]:
            if lib == "peft" and (not with_peft or row in PEFTKIT_ONLY):
                continue
            jobs.append((row, lib))
    # Rounds over all rows (not N runs of one row in a row), so a burst of outside load hits one
    # round of every row rather than every run of one; the lowest median per (row, library) is kept.
    round_jobs = jobs + ([("frozen", "peftkit")] if ("frozen", "peftkit") in jobs else [])
    for round_index in range(args.repeat):
        print(f"round {round_index + 1}/{args.repeat}", file=sys.stderr)
        for row, lib in round_jobs:
            result = run_once(row, lib, args)
            best = results[row].get(lib)
            if result is not None and (best is None or result["step_ms"] < best["step_ms"]):
                results[row][lib] = result
    text = table(results)
    print(text)
    with open(args.json, "w") as handle:
        json.dump({"versions": versions(), "settings": vars(args), "results": results}, handle, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
