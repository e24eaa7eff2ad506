"""FRoD: the adapted weight `W' = U (S + diag(lambda_l)) V^T`, V shared per module role, S sparse and trained."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import FrodConfig
from .layer import FrodLayer, Linear
from .model import FrodModel

METHOD = MethodSpec(
    peft_type=PeftType.FROD,
    config_cls=FrodConfig,
    tuner_cls=FrodModel,
    cli_names=("frod",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "FrodConfig", "FrodLayer", "FrodModel", "Linear"]
