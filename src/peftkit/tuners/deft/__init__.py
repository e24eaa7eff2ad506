"""DEFT: decompositional efficient fine-tuning, `W' = (I - P_proj) W + Q_P (s R)` (a subspace of W replaced)."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import DeftConfig
from .layer import DeftLayer, DeftLinear
from .model import DeftModel

METHOD = MethodSpec(
    peft_type=PeftType.DEFT,
    config_cls=DeftConfig,
    tuner_cls=DeftModel,
    cli_names=("deft",),
    capabilities={MERGE},
    rank_dims={"deft_P": 1, "deft_R": 0},
)

__all__ = ["METHOD", "DeftConfig", "DeftLayer", "DeftLinear", "DeftModel"]
