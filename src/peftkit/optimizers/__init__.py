"""Optimizers tailored to adapters: LoRA+ (`create_loraplus_optimizer`)."""

from .loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
