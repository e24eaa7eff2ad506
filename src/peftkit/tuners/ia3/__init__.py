"""(IA)^3: learned vectors that rescale activations, `y = l * (W x)` or `y = W (l * x)`."""

from .config import IA3Config
from .layer import Conv, IA3Layer, Linear
from .model import IA3Model

__all__ = ["Conv", "IA3Config", "IA3Layer", "IA3Model", "Linear"]
