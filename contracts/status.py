"""The unified status enum, its transition table and the seed's legacy mappings."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from contracts.errors import ValidationError

__all__ = [
    "ACTIVE_STATUSES",
    "STATUS_MAPPINGS",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "SessionStatus",
    "can_transition",
    "map_legacy_status",
]


class SessionStatus(enum.StrEnum):
    """Single source of truth for session status values (seed: SessionStatus)."""

    INITIALIZING = "INITIALIZING"
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CLEANUP = "CLEANUP"


_S = SessionStatus

# Allowed moves out of each status. CLEANUP has none: it ends in a Destroyed event,
# not in another status.
TRANSITIONS: Mapping[SessionStatus, frozenset[SessionStatus]] = MappingProxyType(
    {
        _S.INITIALIZING: frozenset({_S.ACTIVE, _S.FAILED, _S.CANCELLED, _S.CLEANUP}),
        _S.ACTIVE: frozenset({_S.PAUSED, _S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.CLEANUP}),
        _S.PAUSED: frozenset({_S.ACTIVE, _S.FAILED, _S.CANCELLED, _S.CLEANUP}),
        _S.COMPLETED: frozenset({_S.CLEANUP}),
        _S.FAILED: frozenset({_S.CLEANUP}),
        _S.CANCELLED: frozenset({_S.CLEANUP}),
        _S.CLEANUP: frozenset(),
    }
)

# Sessions "in flight": counted as active by list_active_workflow_sessions.
ACTIVE_STATUSES = frozenset({_S.INITIALIZING, _S.ACTIVE, _S.PAUSED})
TERMINAL_STATUSES = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})

# Legacy module statuses -> SessionStatus, exactly as the seed gives them.
STATUS_MAPPINGS: Mapping[str, SessionStatus] = MappingProxyType(
    {
        # AI Integration ConnectionStatus
        "DISCONNECTED": _S.FAILED,
        "CONNECTING": _S.INITIALIZING,
        "CONNECTED": _S.ACTIVE,
        "ERROR": _S.FAILED,
        "RATE_LIMITED": _S.PAUSED,
        # Executor ExecutionStatus (COMPLETED and FAILED keep their names)
        "PENDING": _S.INITIALIZING,
        "IN_PROGRESS": _S.ACTIVE,
        "SKIPPED": _S.CANCELLED,
    }
)


def can_transition(old: SessionStatus, new: SessionStatus) -> bool:
    """Whether ``old -> new`` is allowed. Setting the current status again is allowed
    (a no-op), so this is true when ``old == new``."""
    return old == new or new in TRANSITIONS[old]


def map_legacy_status(value: str) -> SessionStatus:
    """Map a legacy ConnectionStatus / ExecutionStatus value, or a SessionStatus name."""
    if value in STATUS_MAPPINGS:
        return STATUS_MAPPINGS[value]
    try:
        return SessionStatus(value)
    except ValueError:
        raise ValidationError(f"unknown status {value!r}", field="status") from None
