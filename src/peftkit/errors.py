"""The exceptions peftkit raises on a user's mistake or a damaged file.

Each subclasses `ValueError` (what peft raises in the same places), so code written for peft that
catches `ValueError` keeps working; catch `PeftkitError` to handle only ours.
"""


class PeftkitError(ValueError):
    """Base class of every error peftkit raises for bad input."""


class ConfigError(PeftkitError):
    """An adapter config has a bad, missing or conflicting field."""


class TargetModulesError(PeftkitError):
    """`target_modules` matched nothing, or matched a layer type the method cannot wrap."""


class AdapterNameError(PeftkitError):
    """An adapter name is unknown, taken, or unsafe to use as a folder name."""


class CheckpointError(PeftkitError):
    """An adapter checkpoint is missing, truncated, corrupt or does not fit the model."""


class AdapterStateError(PeftkitError):
    """An adapter operation does not fit the model's current state (e.g. unmerge with nothing merged)."""
