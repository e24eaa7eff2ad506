"""OSF: orthogonal subspace fine-tuning, `W = U_high S_high V_high + U_low S_low V_low`, only the low part trained."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import OSFConfig
from .layer import Linear, OSFLayer
from .model import OSFModel

METHOD = MethodSpec(
    peft_type=PeftType.OSF,
    config_cls=OSFConfig,
    tuner_cls=OSFModel,
    cli_names=("osf",),
    capabilities={MERGE},
    display_name="OSF",
)

__all__ = ["METHOD", "Linear", "OSFConfig", "OSFLayer", "OSFModel"]
