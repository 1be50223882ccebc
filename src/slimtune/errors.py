"""Errors slimtune raises on purpose for a user's mistake or setup, as opposed to a bug.

The CLI prints these (and ValueError, the house type for a bad value) as one red line; any other
exception is a bug and keeps its traceback. MissingDependency is also an ImportError, so a caller's
`except ImportError` keeps working.
"""

from __future__ import annotations

__all__ = ["MissingDependency", "SlimtuneError"]


class SlimtuneError(ValueError):
    """A user mistake slimtune detected: the message names the bad value and what is allowed."""


class MissingDependency(SlimtuneError, ImportError):
    """An optional package that the requested feature needs is not installed; the message says what to install."""
