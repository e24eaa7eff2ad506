"""GLoRA: generalized LoRA, `W_eff = W0 + W0 * A + B`, `b_eff = b0 + b0 * D + E + W0 @ C` on Linear layers."""

from ...registry import MERGE, MIXED_BATCH, MethodSpec
from ...utils.peft_types import PeftType
from .config import GloraConfig
from .layer import GloraLayer, GloraLinear, Linear
from .model import GloraModel

METHOD = MethodSpec(
    peft_type=PeftType.GLORA,
    config_cls=GloraConfig,
    tuner_cls=GloraModel,
    cli_names=("glora",),
    capabilities={MERGE, MIXED_BATCH},
    rank_dims={".Xd": 1, ".Xu": 0},
)

__all__ = ["METHOD", "GloraConfig", "GloraLayer", "GloraLinear", "GloraModel", "Linear"]
