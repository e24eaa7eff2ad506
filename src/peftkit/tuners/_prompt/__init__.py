"""Shared machinery of the prompt-learning methods: base config, the tuner, input plumbing."""

from .config import PromptLearningConfig, fill_from_model_config
from .model import PromptLearningModel

__all__ = ["PromptLearningConfig", "PromptLearningModel", "fill_from_model_config"]
