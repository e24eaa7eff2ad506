"""prompt_tuning: config and encoder; importing it registers the method."""

from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding"]
