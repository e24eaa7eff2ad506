"""PVeRA: probabilistic VeRA -- `z ~ N(mu, exp(logvar))` between frozen shared random projections."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import PveraConfig
from .layer import Linear, PveraLayer
from .model import PveraModel

METHOD = MethodSpec(
    peft_type=PeftType.PVERA,
    config_cls=PveraConfig,
    tuner_cls=PveraModel,
    cli_names=("pvera",),
    capabilities={MERGE, QUANTIZED_BASE},
    rank_dims={"pvera_B": 1},
)

__all__ = ["METHOD", "Linear", "PveraConfig", "PveraLayer", "PveraModel"]
