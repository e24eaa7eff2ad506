"""Lily: low-rank interconnected adaptation across layers -- A shared by neighbouring layers, routed Bs shared by all."""

from ...registry import QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import LilyConfig
from .layer import LilyLayer, Linear
from .model import LilyModel

METHOD = MethodSpec(
    peft_type=PeftType.LILY,
    config_cls=LilyConfig,
    tuner_cls=LilyModel,
    cli_names=("lily",),
    capabilities={QUANTIZED_BASE},
    rank_dims={"lily_A.weight": 0},
)

__all__ = ["METHOD", "LilyConfig", "LilyLayer", "LilyModel", "Linear"]
