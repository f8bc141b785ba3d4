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


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error (a read-only folder, a full disk, a path under a file)."""
    what = exc.strerror or type(exc).__name__
    if exc.filename is not None:
        return f"{exc.filename}: {what}" + (f" (-> {exc.filename2})" if exc.filename2 is not None else "")
    return str(exc).strip().splitlines()[0] if str(exc).strip() else what
