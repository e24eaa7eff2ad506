"""LN tuning: the targeted layers (usually the norms) run as trained copies, `y = copy(x)`."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import LNTuningConfig
from .layer import LNTuningLayer
from .model import LNTuningModel

METHOD = MethodSpec(
    peft_type=PeftType.LN_TUNING,
    config_cls=LNTuningConfig,
    tuner_cls=LNTuningModel,
    cli_names=("ln_tuning",),
    capabilities={MERGE},
    display_name="LN tuning",
)

__all__ = ["METHOD", "LNTuningConfig", "LNTuningLayer", "LNTuningModel"]
