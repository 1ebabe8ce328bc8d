"""The exceptions poft_autotune raises on purpose.

Every error caused by user input is an :class:`InvalidConfigError`; its message states the rule, the
value received and the fix, so that it can be acted on without reading our source.
"""

from __future__ import annotations


class PoftError(Exception):
    """Base class of every error raised by poft_autotune itself."""


class InvalidConfigError(PoftError, ValueError):
    """A configuration, argument or input does not satisfy a documented rule."""


class MissingDependencyError(PoftError, ImportError):
    """An optional dependency is needed for the requested feature but is not installed."""


class TrialFailedError(PoftError, RuntimeError):
    """A trial could not produce a result (e.g. the loss became NaN); the study records it as FAIL."""
