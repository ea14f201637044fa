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
