"""Super-Tuning: `W' = W + scatter(indices, values)` on a magnitude-selected sparse support (+ optional LoRA)."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import SupertuningConfig
from .layer import Linear, SupertuningLayer
from .model import SupertuningModel

METHOD = MethodSpec(
    peft_type=PeftType.SUPERTUNING,
    config_cls=SupertuningConfig,
    tuner_cls=SupertuningModel,
    cli_names=("supertuning",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "Linear", "SupertuningConfig", "SupertuningLayer", "SupertuningModel"]
