"""LoRA: low-rank adaptation, `y = W x + (alpha / r) * B A x`."""

from .config import LoraConfig
from .layer import Conv, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = ["Conv", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
