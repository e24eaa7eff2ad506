"""`peftkit inspect`: describe a saved adapter and check its weights against its config."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from .adapter_files import AdapterFolder, read_adapter

EXAMPLES = """examples:
  peftkit inspect out/adapter
  peftkit inspect out/adapter --json           # machine-readable
  peftkit inspect out/adapter --base ./model   # also load it into the base model (strict)
exit status 1 when a check fails."""

_PROMPT_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}
#: Weight-name suffix -> which dimension holds the rank, for the LoRA family.
_RANK_DIMS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_E": 0, "hada_w1_a": 1, "hada_w1_b": 0}


def add_parser(subparsers: Any) -> None:
    """Register `peftkit inspect`."""
    parser = subparsers.add_parser(
        "inspect", help="describe an adapter and check its weights against its config",
        description=__doc__.splitlines()[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--base", help="also load the adapter into this base model, strictly")
    parser.set_defaults(handler=run)


def _module_of(key: str) -> str:
    """`base_model.model.a.b.lora_A.weight` -> `a.b` (the wrapped module's path)."""
    key = key.removeprefix("base_model.model.")
    return re.split(r"\.(lora_|ia3_|hada_|lokr_|adapter_|bottleneck_)", key)[0]


def describe(adapter: AdapterFolder) -> dict[str, Any]:
    """Summary fields of the report (method, base, targets, ranks, sizes)."""
    config = adapter.config
    n_params = sum(t.numel() for t in adapter.weights.values())
    modules = sorted({_module_of(k) for k in adapter.weights if k != "prompt_embeddings"})
    ranks = {config[k] for k in ("r", "init_r", "target_r") if isinstance(config.get(k), int)}
    return {
        "path": adapter.path,
        "method": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"),
        "rank": config.get("r"),
        "ranks": sorted(ranks),
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "modules_with_weights": len(modules),
        "tensors": len(adapter.weights),
        "parameters": n_params,
        "weights_file": os.path.basename(adapter.weights_path),
        "file_size_bytes": os.path.getsize(adapter.weights_path),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in adapter.weights.values()}),
    }


def check(adapter: AdapterFolder) -> list[str]:
    """Problems found comparing weights with the config (empty when consistent)."""
    from peftkit.config import PeftConfig

    problems: list[str] = []
    try:
        PeftConfig.from_pretrained(adapter.path)
    except Exception as exc:  # any config validation error is a finding, not a crash
        problems.append(f"config does not validate: {str(exc).splitlines()[0]}")
    for key, tensor in adapter.weights.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            problems.append(f"{key} holds NaN or inf values")
    if adapter.config.get("peft_type") in _PROMPT_TYPES:
        problems += _check_prompt(adapter)
    else:
        problems += _check_ranks(adapter)
        problems += _check_targets(adapter)
    return problems


def _check_prompt(adapter: AdapterFolder) -> list[str]:
    table = adapter.weights.get("prompt_embeddings")
    if table is None:
        return ["prompt-learning adapter without a prompt_embeddings tensor"]
    n_tokens = adapter.config.get("num_virtual_tokens") or 0
    rows = n_tokens * (adapter.config.get("num_transformer_submodules") or 1)
    if adapter.config.get("peft_type") == "PREFIX_TUNING":
        rows = n_tokens
    if table.shape[0] != rows:
        return [f"prompt_embeddings has {table.shape[0]} rows, config implies {rows}"]
    return []


def _check_ranks(adapter: AdapterFolder) -> list[str]:
    config = adapter.config
    if config.get("peft_type") not in {"LORA", "LOHA"} or config.get("rank_pattern"):
        return []
    problems = []
    for key, tensor in adapter.weights.items():
        for suffix, dim in _RANK_DIMS.items():
            if key.endswith(suffix) and tensor.dim() >= 2 and tensor.shape[dim] != config.get("r"):
                problems.append(f"{key} has rank {tensor.shape[dim]}, config r={config.get('r')}")
    return problems


def _check_targets(adapter: AdapterFolder) -> list[str]:
    targets = adapter.config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        return []
    saved = adapter.config.get("modules_to_save") or []
    problems = []
    for key in adapter.weights:
        module = _module_of(key)
        parts = module.split(".")
        if any(name in parts for name in saved) or any(module == t or module.endswith("." + t) for t in targets):
            continue
        problems.append(f"{key} is on {module}, which matches no target_modules entry")
    return problems[:5]


def _check_with_base(adapter: AdapterFolder, base_id: str) -> list[str]:
    from peftkit import PeftModel

    from .modeling import load_model, quiet_transformers

    quiet_transformers()
    try:
        PeftModel.from_pretrained(load_model(base_id, adapter.task or "causal-lm", adapter.num_labels()), adapter.path)
    except ValueError as exc:
        return [f"does not load into {base_id}: {str(exc).splitlines()[0]}"]
    return []


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Print the report; exit status 1 when a check failed."""
    adapter = read_adapter(args.adapter)
    report = describe(adapter)
    problems = check(adapter) + (_check_with_base(adapter, args.base) if args.base else [])
    report["checks"] = "ok" if not problems else problems
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            if key != "checks":
                print(f"{key:<{width}}  {value if not isinstance(value, int) else f'{value:,}'}")
        print(f"{'checks':<{width}}  " + ("ok" if not problems else "FAILED"))
        for problem in problems:
            print(f"  - {problem}")
    return 1 if problems else 0
