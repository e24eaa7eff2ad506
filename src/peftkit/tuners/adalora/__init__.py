"""AdaLoRA: adaptive-rank LoRA in SVD form, `y = W x + B (A * E) x * lora_alpha / ranknum`."""

from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .model import AdaLoraModel
from .rank_allocator import RankAllocator

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDConv2d", "SVDLinear"]
