"""TinyLoRA: `delta_W = B R A`, frozen SVD factors B, A and `R = sum_i v[i] P[i]` from a tiny trained v."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import TinyLoraConfig
from .layer import Embedding, Linear, TinyLoraLayer
from .model import TinyLoraModel

METHOD = MethodSpec(
    peft_type=PeftType.TINYLORA,
    config_cls=TinyLoraConfig,
    tuner_cls=TinyLoraModel,
    cli_names=("tinylora",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "Embedding", "Linear", "TinyLoraConfig", "TinyLoraLayer", "TinyLoraModel"]
