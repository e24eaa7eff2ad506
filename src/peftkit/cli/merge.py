"""`peftkit merge`: fold an adapter into its base model and save the full model with `save_pretrained`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from peftkit.registry import MERGE

from .adapter_files import read_adapter
from .errors import CliError
from .modeling import load_model, load_tokenizer, quiet_transformers

EXAMPLES = """examples:
  peftkit merge out/adapter --out out/merged                   # base model read from adapter_config.json
  peftkit merge out/adapter --base ./my-model --out out/merged
the merged folder loads with plain transformers: AutoModelFor...from_pretrained("out/merged")"""


def add_parser(subparsers: Any) -> None:
    """Register `peftkit merge`."""
    parser = subparsers.add_parser(
        "merge", help="merge an adapter into its base model and save the full model",
        description=__doc__.splitlines()[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("--base", help="base model folder or hub id (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.add_argument("--safe-merge", action="store_true", help="check the merged weights for NaNs before saving")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Load base + adapter, `merge_and_unload`, save model (and tokenizer when the base has one)."""
    from peftkit import PeftModel

    quiet_transformers()
    adapter = read_adapter(args.adapter)
    base_id = args.base or adapter.base_model()
    if not base_id:
        raise CliError("the adapter does not name its base model; pass --base MODEL")
    spec = adapter.spec  # None for an unknown peft_type: loading the adapter below says so
    if spec is not None and MERGE not in spec.capabilities:
        reason = "add virtual tokens and cannot" if spec.is_prompt_learning else "(a method without merge) cannot"
        raise CliError(f"{spec.peft_type} adapters {reason} be merged into weights")
    task = adapter.task or "causal-lm"
    tokenizer = _try_tokenizer(base_id)
    base = load_model(base_id, task, adapter.num_labels(), tokenizer, label_names=adapter.label_names())
    model = PeftModel.from_pretrained(base, args.adapter)
    merged = model.merge_and_unload(safe_merge=args.safe_merge)
    merged.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(f"merged {adapter.config.get('peft_type')} adapter into {base_id}; saved to {args.out}")
    return 0


def _try_tokenizer(base_id: str) -> Any:
    try:
        return load_tokenizer(base_id)
    except CliError:
        return None
