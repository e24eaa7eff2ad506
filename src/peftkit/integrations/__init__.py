"""Integrations with training frameworks: transformers `Trainer` (and Trainer subclasses such as TRL's).

    from peftkit.integrations import PeftkitTrainer          # drop-in for transformers.Trainer
    from peftkit.integrations import with_peftkit            # with_peftkit(trl.SFTTrainer)
"""

from .trainer import PeftkitTrainer, PeftkitTrainerMixin, load_adapter_checkpoint, with_peftkit

__all__ = ["PeftkitTrainer", "PeftkitTrainerMixin", "load_adapter_checkpoint", "with_peftkit"]
