"""User-facing errors.

Every problem a user can fix (bad config, bad data, a service that is not running) is raised as a
``SpecflowError`` whose message is one line naming the file/field and the fix. CLIs and flows print
that line instead of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SpecflowError(Exception):
    """An error with a one-line, actionable message."""


class ConfigError(SpecflowError):
    """The configuration is invalid (unknown key, wrong type, inconsistent settings)."""


class DataError(SpecflowError):
    """The input data cannot be used (nothing valid remains, unreadable file, ...)."""


class ServiceError(SpecflowError):
    """A service (Mooncake, key queue, endpoint) is unreachable or misbehaving."""
