"""FourierFT: `delta_W = scaling * Re(ifft2(S))`, S a sparse spectrum of n trained coefficients at fixed random frequencies."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import FourierFTConfig
from .layer import FourierFTLayer, FourierFTLinear
from .model import FourierFTModel

METHOD = MethodSpec(
    peft_type=PeftType.FOURIERFT,
    config_cls=FourierFTConfig,
    tuner_cls=FourierFTModel,
    cli_names=("fourierft",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "FourierFTConfig", "FourierFTLayer", "FourierFTLinear", "FourierFTModel"]
