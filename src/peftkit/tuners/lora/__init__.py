"""LoRA: low-rank adaptation, `y = W x + (alpha / r) * B A x`."""

from ...registry import MERGE, MIXED_BATCH, QUANTIZED_BASE, WEIGHTED_COMBINATION, MethodSpec
from ...utils.peft_types import PeftType
from .config import LoraConfig, LoraRuntimeConfig
from .layer import Conv, Embedding, Linear, LoraLayer
from .model import LoraModel

METHOD = MethodSpec(
    peft_type=PeftType.LORA,
    config_cls=LoraConfig,
    tuner_cls=LoraModel,
    cli_names=("lora",),
    cli_preset={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    capabilities={MERGE, MIXED_BATCH, WEIGHTED_COMBINATION, QUANTIZED_BASE},
    rank_dims={"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1},
)

__all__ = ["METHOD", "Conv", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel", "LoraRuntimeConfig"]
