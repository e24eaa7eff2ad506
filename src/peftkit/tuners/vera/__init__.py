"""VeRA: `delta_W = diag(lambda_b) B diag(lambda_d) A`, A and B frozen random projections shared by all layers."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import VeraConfig
from .layer import Linear, VeraLayer
from .model import VeraModel

METHOD = MethodSpec(
    peft_type=PeftType.VERA,
    config_cls=VeraConfig,
    tuner_cls=VeraModel,
    cli_names=("vera",),
    capabilities={MERGE, QUANTIZED_BASE},
    rank_dims={"vera_B": 1},
)

__all__ = ["METHOD", "Linear", "VeraConfig", "VeraLayer", "VeraModel"]
