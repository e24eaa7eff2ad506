"""SHiRA: sparse high-rank adapters, `W' = W + S` with K = r (out + in) trained entries at fixed positions."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import ShiraConfig
from .layer import Linear, ShiraLayer
from .mask_functions import random_mask
from .model import ShiraModel

METHOD = MethodSpec(
    peft_type=PeftType.SHIRA,
    config_cls=ShiraConfig,
    tuner_cls=ShiraModel,
    cli_names=("shira",),
    capabilities={MERGE, QUANTIZED_BASE},
    # no rank_dims: the saved values are (r * (in + out),), not a rank dimension
)

__all__ = ["METHOD", "Linear", "ShiraConfig", "ShiraLayer", "ShiraModel", "random_mask"]
