"""PSOFT: orthogonal fine-tuning in the principal subspace, `delta_W = (alpha / r) B (R - I) A`."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import PsoftConfig
from .layer import Linear, PsoftLayer
from .model import PsoftModel
from .orthogonal import PsoftRotation

METHOD = MethodSpec(
    peft_type=PeftType.PSOFT,
    config_cls=PsoftConfig,
    tuner_cls=PsoftModel,
    cli_names=("psoft",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "Linear", "PsoftConfig", "PsoftLayer", "PsoftModel", "PsoftRotation"]
