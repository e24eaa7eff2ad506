"""Machinery every layer-wrapping method shares: matching, injection, adapter bookkeeping."""

from .layer import BaseTunerLayer
from .modules_to_save import ModulesToSaveWrapper
from .tuner import BaseTuner

__all__ = ["BaseTuner", "BaseTunerLayer", "ModulesToSaveWrapper"]
