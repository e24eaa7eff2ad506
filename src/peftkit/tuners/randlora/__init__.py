"""RandLoRA: full-rank updates from shared random bases, `delta_W = (alpha / r) B diag(lambda) A diag(gamma)`."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import RandLoraConfig
from .layer import RandLoraLayer
from .model import RandLoraModel

METHOD = MethodSpec(
    peft_type=PeftType.RANDLORA,
    config_cls=RandLoraConfig,
    tuner_cls=RandLoraModel,
    cli_names=("randlora",),
    capabilities={MERGE, QUANTIZED_BASE},
)

__all__ = ["METHOD", "RandLoraConfig", "RandLoraLayer", "RandLoraModel"]
