"""What can stop a load run before it measures anything, each with an exit code.

``str(error)`` is always one line naming the problem and the fix; the CLI prints it as is.
The codes follow ``lab client``'s where the meaning is the same.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "LoadError",
    "LoaderFailed",
    "NameNotFound",
    "TargetNotAllowed",
    "TargetRefused",
    "TargetTimedOut",
    "TargetUnreachable",
]


class LoadError(Exception):
    """A load run could not start (or its loaders failed); one line, and an exit code."""

    exit_code: ClassVar[int] = 1


class ConfigError(LoadError):
    """A bad option value, or options that contradict each other."""

    exit_code: ClassVar[int] = 2


class TargetNotAllowed(LoadError):
    """The target is neither loopback nor on a directly connected subnet of this host."""

    exit_code: ClassVar[int] = 2


class TargetRefused(LoadError):
    """Every address of the target refused the connection: nothing listens there."""

    exit_code: ClassVar[int] = 3


class TargetTimedOut(LoadError):
    """No address of the target answered within the timeout."""

    exit_code: ClassVar[int] = 4


class NameNotFound(LoadError):
    """The target's name did not resolve."""

    exit_code: ClassVar[int] = 6


class TargetUnreachable(LoadError):
    """Any other failure to reach the target (no route, address not available …)."""

    exit_code: ClassVar[int] = 8


class LoaderFailed(LoadError):
    """A loader process died or did not report: a bug or a killed process, not the server."""

    exit_code: ClassVar[int] = 1
