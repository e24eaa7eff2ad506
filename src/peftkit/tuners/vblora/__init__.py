"""VB-LoRA: LoRA factors mixed from one shared vector bank, `delta_W = B A`, A/B = top-k mixtures of bank vectors."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import VBLoRAConfig
from .layer import VBLoRALayer
from .model import VBLoRAModel

METHOD = MethodSpec(
    peft_type=PeftType.VBLORA,
    config_cls=VBLoRAConfig,
    tuner_cls=VBLoRAModel,
    cli_names=("vblora",),
    capabilities={MERGE},
    rank_dims={},
)

__all__ = ["METHOD", "VBLoRAConfig", "VBLoRALayer", "VBLoRAModel"]
