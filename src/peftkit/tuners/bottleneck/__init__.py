"""Bottleneck adapters: `h -> h + scaling * up(act(down(h)))` after (or beside) chosen sub-layers."""

from .config import AdapterConfig, BottleneckConfig
from .layer import BottleneckLayer
from .model import Average, BottleneckModel, Stack
from .presets import BLOCK_LAYOUTS, BlockLayout

__all__ = [
    "AdapterConfig",
    "Average",
    "BLOCK_LAYOUTS",
    "BlockLayout",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "Stack",
]
