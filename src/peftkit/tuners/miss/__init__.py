"""MiSS (formerly Bone): a shared shard added to every column block of W, `delta_W[o, i] = D[i mod r, o]`."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import MissConfig
from .layer import MissLayer, MissLinear
from .model import MissModel

METHOD = MethodSpec(
    peft_type=PeftType.MISS,
    config_cls=MissConfig,
    tuner_cls=MissModel,
    cli_names=("miss",),
    capabilities={MERGE, QUANTIZED_BASE},
    # no rank_dims: the shard is r x out, but "bat" saves (out / r) x r x r
)

__all__ = ["METHOD", "MissConfig", "MissLayer", "MissLinear", "MissModel"]
