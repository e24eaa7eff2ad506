"""The CLI's own error: printed as one line (`peftkit: error: ...`), exit status 2."""


class CliError(Exception):
    """A user mistake on the command line (missing file, unknown method, bad field)."""
