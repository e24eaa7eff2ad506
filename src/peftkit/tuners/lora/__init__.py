"""LoRA: low-rank adaptation, `y = W x + (alpha / r) * B A x`."""

from ...registry import MERGE, MIXED_BATCH, QUANTIZED_BASE, WEIGHTED_COMBINATION, MethodSpec
from ...utils.peft_types import PeftType
from .bdlora import BdLoraConfig
from .config import LoraConfig, LoraRuntimeConfig
from .kasa import KasaConfig
from .monteclora import MontecloraConfig
from .velora import VeloraConfig
from .layer import Conv, Embedding, Linear, LoraLayer
from .model import LoraModel
from .arrow import ArrowConfig
from .corda import CordaConfig, preprocess_corda
from .eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from .loftq import LoftQConfig, replace_lora_weights_loftq
from .loraga import LoraGAConfig, preprocess_loraga

METHOD = MethodSpec(
    peft_type=PeftType.LORA,
    config_cls=LoraConfig,
    tuner_cls=LoraModel,
    cli_names=("lora",),
    cli_preset={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    capabilities={MERGE, MIXED_BATCH, WEIGHTED_COMBINATION, QUANTIZED_BASE},
    rank_dims={"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1},
)

__all__ = [
    "METHOD",
    "ArrowConfig",
    "BdLoraConfig",
    "Conv",
    "CordaConfig",
    "Embedding",
    "EvaConfig",
    "KasaConfig",
    "Linear",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "MontecloraConfig",
    "VeloraConfig",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_corda",
    "preprocess_loraga",
    "replace_lora_weights_loftq",
]
