"""p_tuning: config and encoder; importing it registers the method."""

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder"]
