"""Errors that carry a message for the person at the keyboard.

The CLI prints a `UserError` as one line (no traceback) and exits non-zero; anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing path, an unknown name, an impossible setting."""


class NonFiniteLossError(UserError):
    """The model produced a NaN or Inf loss; results would be meaningless."""


class ResultFileError(UserError):
    """A file that exists in name only: missing, truncated, unreadable or malformed."""
