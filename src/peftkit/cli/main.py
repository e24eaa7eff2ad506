"""`peftkit` console script: argparse with one subcommand per module; errors print as one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from .errors import CliError

DESCRIPTION = """peftkit: train, merge, inspect, compare and chat with parameter-efficient adapters (peft format).

examples:
  peftkit train                                  # LoRA on MiniLM with the bundled data (a few minutes)
  peftkit train --model ./tiny --data d.jsonl --task causal-lm --method lora --r 4
  peftkit merge out/adapter --out merged/
  peftkit inspect out/adapter
  peftkit compare --model ./tiny --methods lora,ia3,prompt --train-steps 5
  peftkit chat --adapter out/adapter             # try a causal-LM adapter, streamed
run `peftkit COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from . import chat, compare, inspect, merge, train

    parser = argparse.ArgumentParser(
        prog="peftkit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    from peftkit import __version__

    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, merge, inspect, compare, chat):
        module.add_parser(subparsers)
    for sub in subparsers.choices.values():
        sub.allow_abbrev = False
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand; returns the exit status (2 and one `peftkit: error:` line on a user error)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes' CPU backend warns at import when the optional `kernels` package is missing, and
    # transformers imports bitsandbytes whenever peft is installed: keep the CLI's output to its own.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_method_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args, extra) or 0)
    except CliError as exc:
        return _fail(str(exc), exc.exit_status)
    except FileNotFoundError as exc:
        return _fail(f"file not found: {exc.filename or exc}")
    except ValueError as exc:  # peftkit's own errors subclass ValueError and are written as one sentence
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")


def _fail(message: str, status: int = 2) -> int:
    print(f"peftkit: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
