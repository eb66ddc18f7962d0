"""The coordinator's exception tree.

Every rule violation is a ``CommandRejected`` carrying the ``ErrorCode`` its
``StandardError`` reply will have, so domain errors map 1:1 to wire errors.
"""

from __future__ import annotations

from typing import Any

from contracts import ErrorCode, StandardError

__all__ = [
    "CommandRejected",
    "ConfigurationError",
    "CoordinatorError",
    "StoreFull",
    "StoreIOError",
    "StoreLocked",
    "StoreReadOnly",
    "StoreUnavailable",
]


class CoordinatorError(Exception):
    """Root of every error raised by ``coordinator``."""


class ConfigurationError(CoordinatorError):
    """A setting (store URL, broker URL, identity map …) is invalid."""


class StoreUnavailable(CoordinatorError):
    """The event store could not be reached or refused the write; nothing was stored.
    ``reason`` is a short stable word for replies and logs."""

    reason = "unreachable"

    def rejection(self) -> CommandRejected:
        """What a command that met this error is answered: retryable, since sending
        the same command again once the store is back applies it once."""
        return CommandRejected(
            ErrorCode.STORE_UNAVAILABLE,
            f"event store unavailable ({self.reason}): {self}",
            retryable=True,
            reason=self.reason,
        )


class StoreFull(StoreUnavailable):
    """The disk under the store is full (SQLite: "database or disk is full")."""

    reason = "full"


class StoreReadOnly(StoreUnavailable):
    """The store accepts no writes (a read-only file or file system)."""

    reason = "read-only"


class StoreIOError(StoreUnavailable):
    """The file system refused a write (SQLite: "disk I/O error"): a file made
    immutable, a file system remounted read-only under open files, a failing disk."""

    reason = "io-error"


class StoreLocked(StoreUnavailable):
    """Another process holds the store (SQLite: its lock, or a second coordinator)."""

    reason = "locked"


class CommandRejected(CoordinatorError):
    """A command broke a rule; nothing was stored."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        module_id: str | None = None,
        field: str | None = None,
        retryable: bool = False,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.module_id = module_id
        self.field = field
        self.retryable = retryable
        self.details = details

    def to_standard_error(self) -> StandardError:
        """The wire form of this rejection."""
        return StandardError(
            code=self.code,
            message=self.message,
            module_id=self.module_id,
            field=self.field,
            retryable=self.retryable,
            details={k: str(v) for k, v in self.details.items()},
        )
