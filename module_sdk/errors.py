"""The module SDK's exception tree."""

from __future__ import annotations

from contracts import ErrorCode, StandardError

__all__ = ["CommandFailed", "CoordinatorUnavailable", "SdkError"]


class SdkError(Exception):
    """Root of every error raised by ``module_sdk``."""


class CommandFailed(SdkError):
    """The coordinator refused a command; ``error`` is its typed reason."""

    def __init__(self, error: StandardError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error

    @property
    def code(self) -> ErrorCode:
        return self.error.code


class CoordinatorUnavailable(SdkError):
    """No reply from the coordinator within the timeout, after every retry."""
