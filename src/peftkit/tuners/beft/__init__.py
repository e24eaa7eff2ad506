"""BEFT: bias-efficient fine-tuning, `y = W0 x + b0 + beft_bias` on (by default) the value projections."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import BeftConfig
from .layer import BeftLayer, Linear
from .model import BeftModel

METHOD = MethodSpec(
    peft_type=PeftType.BEFT,
    config_cls=BeftConfig,
    tuner_cls=BeftModel,
    cli_names=("beft",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "BeftConfig", "BeftLayer", "BeftModel", "Linear"]
