"""RoAd: 2-D rotation adaptation, `y = R (W x + b)` with R made of learned 2 x 2 rotations and scales."""

from ...registry import MERGE, MIXED_BATCH, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import RoadConfig
from .layer import Linear, RoadLayer
from .model import RoadModel

METHOD = MethodSpec(
    peft_type=PeftType.ROAD,
    config_cls=RoadConfig,
    tuner_cls=RoadModel,
    cli_names=("road",),
    capabilities={MERGE, MIXED_BATCH, QUANTIZED_BASE},
)

__all__ = ["METHOD", "Linear", "RoadConfig", "RoadLayer", "RoadModel"]
