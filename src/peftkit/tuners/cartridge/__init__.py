"""cartridge: a trained KV-cache prefix (and its helpers, peft's top-level names); `METHOD` declares it."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import CartridgeConfig
from .model import CartridgeEncoder, CartridgeModel
from .utils import (
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)

#: Checkpoints hold one table, `prompt_embeddings` (the whole cache prefix), so that is the key prefix.
METHOD = MethodSpec(
    peft_type=PeftType.CARTRIDGE,
    config_cls=CartridgeConfig,
    tuner_cls=CartridgeModel,
    prefix="prompt_embeddings",
    cli_names=("cartridge",),
    cli_defaults={"num_virtual_tokens": 8},
    fsdp_wrap_classes=(CartridgeEncoder,),
)

__all__ = [
    "METHOD",
    "CartridgeConfig",
    "CartridgeEncoder",
    "CartridgeModel",
    "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text",
    "prompt_embeddings_from_past_key_values",
]
