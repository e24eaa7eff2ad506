"""WaveFT: `delta_W = scaling * IDWT2(S)`, S a sparse matrix of n trained wavelet coefficients at fixed random positions."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import WaveFTConfig
from .layer import WaveFTLayer, WaveFTLinear
from .model import WaveFTModel

METHOD = MethodSpec(
    peft_type=PeftType.WAVEFT,
    config_cls=WaveFTConfig,
    tuner_cls=WaveFTModel,
    cli_names=("waveft",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "WaveFTConfig", "WaveFTLayer", "WaveFTLinear", "WaveFTModel"]
