"""Optimizers tailored to adapters: LoRA+ (`create_loraplus_optimizer`), fused AdamW (`adamw`)."""

from .adamw import adamw
from .loraplus import create_loraplus_optimizer

__all__ = ["adamw", "create_loraplus_optimizer"]
