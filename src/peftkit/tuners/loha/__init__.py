"""LoHa: low-rank Hadamard product, `delta_W = (W1a W1b) * (W2a W2b) * alpha / r`."""

from .config import LoHaConfig
from .layer import LoHaLayer
from .model import LoHaModel

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel"]
