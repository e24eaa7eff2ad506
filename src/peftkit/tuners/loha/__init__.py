"""LoHa: low-rank Hadamard product, `delta_W = (W1a W1b) * (W2a W2b) * alpha / r`."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import LoHaConfig
from .layer import LoHaLayer
from .model import LoHaModel

METHOD = MethodSpec(
    peft_type=PeftType.LOHA,
    config_cls=LoHaConfig,
    tuner_cls=LoHaModel,
    cli_names=("loha",),
    capabilities={MERGE, QUANTIZED_BASE},
    rank_dims={"hada_w1_a": 1, "hada_w1_b": 0},
)

__all__ = ["METHOD", "LoHaConfig", "LoHaLayer", "LoHaModel"]
