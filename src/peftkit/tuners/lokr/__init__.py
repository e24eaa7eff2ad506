"""LoKr: low-rank Kronecker product, `delta_W = kron(W1, W2) * alpha / r`."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import LoKrConfig
from .layer import LoKrLayer, factorization
from .model import LoKrModel

METHOD = MethodSpec(
    peft_type=PeftType.LOKR,
    config_cls=LoKrConfig,
    tuner_cls=LoKrModel,
    cli_names=("lokr",),
    capabilities={MERGE, QUANTIZED_BASE},
)

__all__ = ["METHOD", "LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]
