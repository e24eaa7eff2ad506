"""(IA)^3: learned vectors that rescale activations, `y = l * (W x)` or `y = W (l * x)`."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import IA3Config
from .layer import Conv, IA3Layer, Linear
from .model import IA3Model

METHOD = MethodSpec(
    peft_type=PeftType.IA3,
    config_cls=IA3Config,
    tuner_cls=IA3Model,
    cli_names=("ia3",),
    capabilities={MERGE, QUANTIZED_BASE},
)

__all__ = ["METHOD", "Conv", "IA3Config", "IA3Layer", "IA3Model", "Linear"]
