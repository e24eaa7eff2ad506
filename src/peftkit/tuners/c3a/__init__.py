"""C3A: circular convolution adaptation, `delta_W` block-circulant (one b-vector per block), applied with FFTs."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import C3AConfig
from .layer import C3ALayer
from .model import C3AModel

METHOD = MethodSpec(
    peft_type=PeftType.C3A,
    config_cls=C3AConfig,
    tuner_cls=C3AModel,
    cli_names=("c3a",),
    capabilities={MERGE},
)

#: peft's name for the Linear layer.
C3ALinear = C3ALayer

__all__ = ["METHOD", "C3AConfig", "C3ALayer", "C3ALinear", "C3AModel"]
