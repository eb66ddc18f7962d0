"""The module SDK's exception tree."""

from __future__ import annotations

from contracts import ErrorCode, StandardError

__all__ = ["CommandFailed", "CoordinatorUnavailable", "SdkError", "StoreUnavailable"]


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


class StoreUnavailable(CoordinatorUnavailable):
    """The coordinator answered, every attempt, that its event store is unavailable
    (``STORE_UNAVAILABLE``): nothing was stored, and the same call may be made again
    later. ``error`` is the last refusal."""

    retryable = True

    def __init__(self, message: str, error: StandardError) -> None:
        super().__init__(message)
        self.error = error
