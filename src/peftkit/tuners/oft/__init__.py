"""OFT: orthogonal fine-tuning, `W' = W R^T` with R block-diagonal Cayley rotations."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import OFTConfig
from .layer import Conv2d, Embedding, Linear, OFTLayer
from .model import OFTModel
from .rotation import OFTRotationModule

METHOD = MethodSpec(
    peft_type=PeftType.OFT,
    config_cls=OFTConfig,
    tuner_cls=OFTModel,
    cli_names=("oft",),
    capabilities={MERGE, QUANTIZED_BASE},
)

__all__ = ["METHOD", "Conv2d", "Embedding", "Linear", "OFTConfig", "OFTLayer", "OFTModel", "OFTRotationModule"]
