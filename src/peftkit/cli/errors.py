"""The CLI's own errors: printed as one line (`peftkit: error: ...`); exit status 2, or 1 for a failed run."""


class CliError(Exception):
    """A user mistake on the command line (missing file, unknown method, bad field): exit status 2."""

    exit_status = 2


class RunFailed(CliError):
    """A run that started but cannot give a usable result (e.g. the loss became NaN): exit status 1."""

    exit_status = 1
