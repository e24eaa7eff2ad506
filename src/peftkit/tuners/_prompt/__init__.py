"""Shared machinery of the prompt-learning methods: base config, the tuner, input plumbing."""

from .config import PromptLearningConfig, fill_from_model_config
from .model import PromptLearningModel, register_prompt_encoder

__all__ = ["PromptLearningConfig", "PromptLearningModel", "fill_from_model_config", "register_prompt_encoder"]
