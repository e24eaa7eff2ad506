"""Bottleneck adapters: `h -> h + scaling * up(act(down(h)))` after (or beside) chosen sub-layers."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import AdapterConfig, BottleneckConfig
from .layer import BottleneckLayer
from .model import Average, BottleneckModel, Stack
from .presets import BLOCK_LAYOUTS, BlockLayout

#: Not mergeable (the activation makes it nonlinear); targets default from the presets, not a table.
METHOD = MethodSpec(
    peft_type=PeftType.BOTTLENECK,
    config_cls=BottleneckConfig,
    tuner_cls=BottleneckModel,
    cli_names=("adapter", "bottleneck"),
)

__all__ = [
    "METHOD",
    "AdapterConfig",
    "Average",
    "BLOCK_LAYOUTS",
    "BlockLayout",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "Stack",
]
