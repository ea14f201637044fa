"""User-facing errors.

A ``BevnextError`` is a problem with the user's input or environment (a missing file, a bad config
value, an unavailable device). The ``bevnext`` command prints its message as one line and exits
non-zero, without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BevnextError(Exception):
    """A problem the user can fix; the message names the file/key and what was expected."""


class DataError(BevnextError):
    """A dataset, info file or data file is missing, corrupt or of the wrong format."""


class ConfigError(BevnextError):
    """A config key or value is unknown or out of range."""


def one_line(exc: BaseException, *, with_type: bool = False, first_line_only: bool = False) -> str:
    """An exception's message on a single line, for error messages and logs.

    Third-party errors (the nuScenes devkit's assertions, CANN's import failures) often span several
    lines; every run of whitespace, newlines included, becomes one space so the message stays one line.

    Args:
        exc: the exception.
        with_type: prefix the type name, ``"Type: message"``.
        first_line_only: keep only the first non-empty line of the message (for errors whose later lines
            are advice or tracebacks rather than the reason).

    Returns:
        The collapsed message; just the type name when the message is empty.
    """
    message = str(exc)
    if first_line_only:
        message = next((line for line in message.splitlines() if line.strip()), "")
    text = " ".join(message.split())
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type else text
