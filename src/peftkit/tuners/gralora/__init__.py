"""GraLoRA: granular low-rank adaptation, a rank-(r/k) LoRA per block of a k x k grid over W (+ a hybrid LoRA)."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import GraloraConfig
from .layer import GraloraLayer, Linear
from .model import GraloraModel

METHOD = MethodSpec(
    peft_type=PeftType.GRALORA,
    config_cls=GraloraConfig,
    tuner_cls=GraloraModel,
    cli_names=("gralora",),
    capabilities={MERGE, QUANTIZED_BASE},
    rank_dims={"gralora_A": 2, "gralora_B": 1},
)

__all__ = ["METHOD", "GraloraConfig", "GraloraLayer", "GraloraModel", "Linear"]
