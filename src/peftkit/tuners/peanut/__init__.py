"""PEANuT: weight-aware neural tweakers, `delta_W = scaling * (B g(f(W^T A^T)))^T` from the frozen weight."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import PeanutConfig
from .layer import Linear, PeanutLayer
from .model import PeanutModel

METHOD = MethodSpec(
    peft_type=PeftType.PEANUT,
    config_cls=PeanutConfig,
    tuner_cls=PeanutModel,
    cli_names=("peanut",),
    capabilities={MERGE},
    rank_dims={"peanut_A.weight": 0, "peanut_B.weight": 1},
)

__all__ = ["METHOD", "Linear", "PeanutConfig", "PeanutLayer", "PeanutModel"]
