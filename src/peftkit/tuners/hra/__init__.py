"""HRA: Householder reflection adaptation, `W' = W H` with H a product of r reflections."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import HRAConfig
from .layer import HRAConv2d, HRALayer, HRALinear
from .model import HRAModel

METHOD = MethodSpec(
    peft_type=PeftType.HRA,
    config_cls=HRAConfig,
    tuner_cls=HRAModel,
    cli_names=("hra",),
    capabilities={MERGE, QUANTIZED_BASE},
    rank_dims={"hra_u": 1},
)

__all__ = ["METHOD", "HRAConfig", "HRAConv2d", "HRALayer", "HRALinear", "HRAModel"]
