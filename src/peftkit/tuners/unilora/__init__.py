"""Uni-LoRA: one trained vector per adapter; each layer's `A`, `B` gather (scaled) entries of it, `delta_W = B A`."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import UniLoraConfig
from .layer import UniLoraLayer
from .model import UniLoraModel

METHOD = MethodSpec(
    peft_type=PeftType.UNILORA,
    config_cls=UniLoraConfig,
    tuner_cls=UniLoraModel,
    cli_names=("unilora",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "UniLoraConfig", "UniLoraLayer", "UniLoraModel"]
