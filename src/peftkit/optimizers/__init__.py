"""Optimizers tailored to adapters: LoRA+ (`create_loraplus_optimizer`), Riemannian-preconditioned LoRA
(`create_riemannian_optimizer`), fused AdamW (`adamw`)."""

from .adamw import adamw
from .loraplus import create_loraplus_optimizer
from .riemannian import create_riemannian_optimizer

__all__ = ["adamw", "create_loraplus_optimizer", "create_riemannian_optimizer"]
