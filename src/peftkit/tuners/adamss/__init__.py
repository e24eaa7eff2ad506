"""AdaMSS: `W' = W + P(concat_k B_k A_k V_r^T)`, low-rank updates in K clustered subspaces of W's SVD."""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .config import AdamssConfig
from .layer import AdamssLayer, Linear
from .model import AdamssModel

METHOD = MethodSpec(
    peft_type=PeftType.ADAMSS,
    config_cls=AdamssConfig,
    tuner_cls=AdamssModel,
    cli_names=("adamss",),
    capabilities={MERGE},
    display_name="AdaMSS",
)

__all__ = ["METHOD", "AdamssConfig", "AdamssLayer", "AdamssModel", "Linear"]
