"""`peftkit inspect`: describe a saved adapter and check its weights against its config."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from peftkit.registry import registered_methods

from .adapter_files import AdapterFolder, read_adapter
from .errors import CliError

EXAMPLES = """examples:
  peftkit inspect out/adapter
  peftkit inspect out/adapter --json           # machine-readable
  peftkit inspect out/adapter --base ./model   # also load it into the base model (strict)
exit status 1 when a check fails."""


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


def _key_prefixes() -> tuple[str, ...]:
    """Every known method's checkpoint-key prefix (`MethodSpec.prefix`), longest first."""
    return tuple(sorted({spec.prefix for spec in registered_methods()}, key=len, reverse=True))


def _is_tuner_level(key: str) -> bool:
    """A tensor the tuner holds itself (`base_model.vera_A`, `base_model.shadow_backbone...`): on no module."""
    return key.startswith("base_model.") and not key.startswith("base_model.model.")


def _module_of(key: str) -> str:
    """`base_model.model.a.b.lora_A.weight` -> `a.b` (the wrapped module's path)."""
    key = key.removeprefix("base_model.model.")
    return re.split(r"\.(" + "|".join(map(re.escape, _key_prefixes())) + ")", key)[0]


def describe(adapter: AdapterFolder) -> dict[str, Any]:
    """Summary fields of the report (method, base, targets, ranks, sizes)."""
    config = adapter.config
    n_params = sum(t.numel() for t in adapter.weights.values())
    prefixes = _key_prefixes()  # a key that starts with one (a prompt table) is on no module
    modules = sorted({_module_of(k) for k in adapter.weights if not k.startswith(prefixes) and not _is_tuner_level(k)})
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
    loaded = None
    try:
        loaded = PeftConfig.from_pretrained(adapter.path)
    except Exception as exc:  # any config validation error is a finding, not a crash
        problems.append(f"config does not validate: {str(exc).splitlines()[0]}")
    for key, tensor in adapter.weights.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            problems.append(f"{key} holds NaN or inf values")
    spec = adapter.spec
    if spec is not None and spec.is_prompt_learning:
        problems += _check_prompt(adapter, spec.prefix, loaded)
    else:
        problems += _check_ranks(adapter, spec.rank_dims if spec is not None else {})
        problems += _check_targets(adapter)
    return problems


def _check_prompt(adapter: AdapterFolder, table_key: str, loaded: Any) -> list[str]:
    """The prompt table (`table_key`, the method's prefix) has the rows the config implies."""
    table = adapter.weights.get(table_key)
    if table is None:
        return [f"prompt-learning adapter without a {table_key} tensor"]
    if loaded is None:
        return []  # the config did not validate (reported already); it implies no row count
    n_tokens = adapter.config.get("num_virtual_tokens") or 0
    # Key/value prefixes (prefix tuning) are one row per token whatever the number of submodules.
    rows = n_tokens if loaded.uses_kv_heads() else n_tokens * (adapter.config.get("num_transformer_submodules") or 1)
    if table.shape[0] != rows:
        return [f"{table_key} has {table.shape[0]} rows, config implies {rows}"]
    return []


def _check_ranks(adapter: AdapterFolder, rank_dims: Mapping[str, int]) -> list[str]:
    """Weights named in the method's `MethodSpec.rank_dims` hold `r` ranks (unless a rank_pattern varies them)."""
    config = adapter.config
    if not rank_dims or config.get("rank_pattern"):
        return []
    problems = []
    for key, tensor in adapter.weights.items():
        for suffix, dim in rank_dims.items():
            if key.endswith(suffix) and tensor.dim() >= 2 and tensor.shape[dim] != config.get("r"):
                problems.append(f"{key} has rank {tensor.shape[dim]}, config r={config.get('r')}")
    return problems


def _check_targets(adapter: AdapterFolder) -> list[str]:
    """Weights on modules no target_modules / modules_to_save entry names (string entries only:
    the raw config may be damaged, and a bad field is reported by the config check)."""
    targets = adapter.config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        return []
    targets = [t for t in targets if isinstance(t, str)]
    saved = adapter.config.get("modules_to_save")
    saved = [name for name in saved if isinstance(name, str)] if isinstance(saved, list) else []
    problems = []
    for key in adapter.weights:
        if _is_tuner_level(key):
            continue
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
    try:
        report = describe(adapter)
        problems = check(adapter) + (_check_with_base(adapter, args.base) if args.base else [])
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        # A damaged config whose fields have the wrong types: one line, never a traceback.
        raise CliError(f"cannot inspect {args.adapter}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
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
