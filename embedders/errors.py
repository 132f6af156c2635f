"""Errors shared by every layer.

``UserError`` is a bad invocation (missing file, missing column, wrong type, bad config value): the CLI prints
its message as one line and exits with code 2, no traceback. Messages name the file/field/value and say what to do.
"""


class UserError(Exception):
    """A mistake in how shopvec was called; printed as one line, exit code 2."""

    exit_code = 2


class RecordError(Exception):
    """A bad *record* (not a bad invocation): becomes a dead letter with ``stage`` and ``error`` class."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error
        self.message = message
