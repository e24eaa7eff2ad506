"""Integrations with training frameworks.

`import peftkit` makes transformers' `Trainer` (and its subclasses, TRL's included) treat peftkit
models as peft models (`recognition.py`): adapter-only checkpoints, resume, `load_best_model_at_end`.

    from peftkit.integrations import PeftkitTrainer          # kept name; transformers.Trainer works as well
    from peftkit.integrations.trl import PeftkitSFTTrainer   # TRL's SFTTrainer with a peftkit model

Names load lazily: importing this package does not import transformers' Trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PeftkitTrainer", "PeftkitTrainerMixin", "load_adapter_checkpoint", "with_peftkit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
