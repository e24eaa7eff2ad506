"""BOFT: butterfly orthogonal fine-tuning, `W' = (W R^T) * s` with R a product of butterfly rotations."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .butterfly import MultiplicativeDropoutLayer
from .config import BOFTConfig
from .layer import BOFTLayer, Conv2d, Linear
from .model import BOFTModel

METHOD = MethodSpec(
    peft_type=PeftType.BOFT,
    config_cls=BOFTConfig,
    tuner_cls=BOFTModel,
    cli_names=("boft",),
    capabilities={MERGE, QUANTIZED_BASE},
)

__all__ = ["METHOD", "BOFTConfig", "BOFTLayer", "BOFTModel", "Conv2d", "Linear", "MultiplicativeDropoutLayer"]
