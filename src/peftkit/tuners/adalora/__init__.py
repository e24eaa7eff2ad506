"""AdaLoRA: adaptive-rank LoRA in SVD form, `y = W x + B (A * E) x * lora_alpha / ranknum`."""

from ...registry import MERGE, QUANTIZED_BASE, TRAIN_STEPS, MethodSpec
from ...utils.peft_types import PeftType
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .model import AdaLoraModel
from .rank_allocator import RankAllocator

#: No mixed batches or weighted combination: AdaLoRA's SVD layers implement neither.
METHOD = MethodSpec(
    peft_type=PeftType.ADALORA,
    config_cls=AdaLoraConfig,
    tuner_cls=AdaLoraModel,
    cli_names=("adalora",),
    cli_defaults={"total_step": TRAIN_STEPS},
    capabilities={MERGE, QUANTIZED_BASE},
)

__all__ = ["METHOD", "AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDConv2d", "SVDLinear"]
