"""The contracts' exception tree and the wire form of errors.

Exceptions are for code that encodes or decodes messages. ``StandardError`` is the
wire form: errors cross the bus as data with a stable ``ErrorCode``, never as a
traceback string.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgspec

__all__ = [
    "ContractsError",
    "DecodeError",
    "EncodeError",
    "ErrorCode",
    "MessageTooLarge",
    "StandardError",
    "ValidationError",
]


class ContractsError(Exception):
    """Root of every error raised by ``contracts``."""


class EncodeError(ContractsError):
    """A value could not be encoded as a message."""


class DecodeError(ContractsError):
    """Bytes could not be decoded into a message: not the format, or not the shape.

    ``field`` is the JSON path of the offending field (``$.event.session_id``) when the
    decoder could name it, else ``None``.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ValidationError(DecodeError, ValueError):
    """Well-formed bytes whose content breaks the schema (wrong type, missing field,
    unknown tag, non-UUID id, value out of range)."""


class MessageTooLarge(DecodeError):
    """A body over the codec's size limit; refused before any parsing."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message body is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


_PATH = re.compile(r" - at `(?P<path>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")


def field_path(msgspec_message: str) -> str | None:
    """Extract the ``$.a.b`` path msgspec appends to its validation messages."""
    match = _PATH.search(msgspec_message)
    path = match.group("path") if match else None
    # msgspec gives the path of the object a required field is missing from (none at
    # the top level); the offending field is the missing one.
    missing = _MISSING.match(msgspec_message)
    if missing:
        return f"{path or '$'}.{missing.group('name')}"
    return path


class ErrorCode(enum.StrEnum):
    """Stable error codes. Never renumber or rename one: clients switch on them."""

    INVALID_MESSAGE = "INVALID_MESSAGE"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    UNSUPPORTED_SCHEMA = "UNSUPPORTED_SCHEMA"
    INVALID_ID = "INVALID_ID"
    UNKNOWN_SESSION = "UNKNOWN_SESSION"
    SESSION_EXISTS = "SESSION_EXISTS"
    SESSION_DESTROYED = "SESSION_DESTROYED"
    SESSION_CLOSED = "SESSION_CLOSED"
    INVALID_TRANSITION = "INVALID_TRANSITION"
    MODULE_NOT_REGISTERED = "MODULE_NOT_REGISTERED"
    MODULE_ALREADY_LINKED = "MODULE_ALREADY_LINKED"
    MODULE_NOT_LINKED = "MODULE_NOT_LINKED"
    FORBIDDEN = "FORBIDDEN"
    CONFLICT = "CONFLICT"
    LINK_TIMEOUT = "LINK_TIMEOUT"
    INACTIVITY_TIMEOUT = "INACTIVITY_TIMEOUT"
    CLEANUP_TIMEOUT = "CLEANUP_TIMEOUT"
    MODULE_ERROR = "MODULE_ERROR"
    MODULE_UNHEALTHY = "MODULE_UNHEALTHY"
    TIMEOUT = "TIMEOUT"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    # The coordinator is up but its event store is not (unreachable, disk full,
    # read-only): nothing was stored; the same command may be sent again.
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


class StandardError(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An error as data: the seed's ``StandardError``.

    ``retryable`` tells a client whether sending the same command again may succeed.
    """

    code: ErrorCode
    message: str
    module_id: str | None = None
    field: str | None = None
    retryable: bool = False
    details: dict[str, Any] = msgspec.field(default_factory=dict)
