"""prefix_tuning: config and encoder; importing it registers the method."""

from .config import PrefixTuningConfig
from .model import PrefixEncoder

__all__ = ["PrefixTuningConfig", "PrefixEncoder"]
