"""Injectable time, so lifecycle timeouts are tested without sleeping."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """A source of timezone-aware UTC time."""

    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock UTC time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to. Timeouts fire only when something asks
    (a command, ``SessionCoordinator.run_timeouts``), never on an idle wake-up."""

    autonomous = False

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, *, seconds: float = 0.0, milliseconds: float = 0.0) -> datetime:
        """Move forward and return the new time."""
        with self._lock:
            self._now += timedelta(seconds=seconds, milliseconds=milliseconds)
            return self._now
