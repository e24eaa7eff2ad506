"""DeLoRA: decoupled low-rank adaptation, `delta_W = (lambda / r) B diag(1 / (|A_i| |B^i|)) A diag(|W0^j|)`."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import DeloraConfig
from .layer import DeloraLayer, DeloraLinear
from .model import DeloraModel

METHOD = MethodSpec(
    peft_type=PeftType.DELORA,
    config_cls=DeloraConfig,
    tuner_cls=DeloraModel,
    cli_names=("delora",),
    capabilities={MERGE},
    rank_dims={"delora_A": 0, "delora_B": 1},
)

__all__ = ["METHOD", "DeloraConfig", "DeloraLayer", "DeloraLinear", "DeloraModel"]
