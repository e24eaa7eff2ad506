"""The `peftkit` command line: train, merge, inspect and compare adapters (see docs/CLI.md)."""

from .main import main

__all__ = ["main"]
