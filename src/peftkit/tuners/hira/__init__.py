"""HiRA: Hadamard high-rank adaptation, `delta_W = W0 * (B A)` (element-wise with the frozen base weight)."""

from ...registry import MERGE, QUANTIZED_BASE, MethodSpec
from ...utils.peft_types import PeftType
from .config import HiraConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, HiraLayer, Linear
from .model import HiraModel

METHOD = MethodSpec(
    peft_type=PeftType.HIRA,
    config_cls=HiraConfig,
    tuner_cls=HiraModel,
    cli_names=("hira",),
    capabilities={MERGE, QUANTIZED_BASE},
    rank_dims={"hira_A": 0, "hira_B": 1},
)

__all__ = ["METHOD", "Conv1d", "Conv2d", "Conv3d", "Embedding", "HiraConfig", "HiraLayer", "HiraModel", "Linear"]
