"""The exceptions (and the warning class) peftkit raises on a user's mistake or a damaged file.

Each subclasses `ValueError` (what peft raises in the same places), so code written for peft that
catches `ValueError` keeps working; catch `PeftkitError` to handle only ours.

peft's names are real classes here with peft's bases, so `except` clauses written for peft catch
ours: `PeftError` (peft's base error) is a base of `PeftkitError`; `NoMatchingPeftModuleError`
(`PeftError`, `ValueError`) is a base of `TargetModulesError`; `PeftWarning` is a `UserWarning`.
"""


class PeftError(Exception):
    """Base PEFT error (peft's name): every error of peftkit's is one."""


class PeftWarning(UserWarning):
    """Base PEFT warning (peft's name)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter being injected matched no module of the base model (peft's name).

    A `ValueError`, as in peft; peftkit raises it as `TargetModulesError`.
    """


class PeftkitError(PeftError, ValueError):
    """Base class of every error peftkit raises for bad input."""


class ConfigError(PeftkitError):
    """An adapter config has a bad, missing or conflicting field."""


class TargetModulesError(PeftkitError, NoMatchingPeftModuleError):
    """`target_modules` matched nothing, or matched a layer type the method cannot wrap.

    Catchable as peft's `NoMatchingPeftModuleError` (what peft raises when nothing matched).
    """


class AdapterNameError(PeftkitError):
    """An adapter name is unknown, taken, or unsafe to use as a folder name."""


class CheckpointError(PeftkitError):
    """An adapter checkpoint is missing, truncated, corrupt or does not fit the model."""


class CheckpointShapeError(CheckpointError, RuntimeError):
    """A checkpoint tensor's shape differs from the model's (a RuntimeError too, as torch's "size mismatch")."""


class AdapterStateError(PeftkitError):
    """An adapter operation does not fit the model's current state (e.g. unmerge with nothing merged)."""


class NotMergeableError(AdapterStateError, NotImplementedError):
    """Merging a method whose update is no fixed weight delta (peft raises NotImplementedError)."""
