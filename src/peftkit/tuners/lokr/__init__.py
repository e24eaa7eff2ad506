"""LoKr: low-rank Kronecker product, `delta_W = kron(W1, W2) * alpha / r`."""

from .config import LoKrConfig
from .layer import LoKrLayer, factorization
from .model import LoKrModel

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]
