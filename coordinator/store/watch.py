"""Waking a follower of the store's notification log when it grows.

Several coordinators may share one PostgreSQL store; each follows what the others
append. eventsourcing's PostgreSQL recorder issues ``NOTIFY <channel>`` in every
transaction that inserts events (the channel is ``recorder.channel_name``), which
PostgreSQL delivers to every listening session when that transaction commits (an
undocumented behaviour: see ``coordinator.store.eventsourcing_internals``). A
follower that LISTENs on its own connection is woken within milliseconds of another
coordinator's commit, instead of at its next poll.

Not the library's ``recorder.subscribe()``: its subscription reads every notification
(state included) after a position in a thread of its own, on a connection taken from
the store's pool for good, and a coordinator follows its own writes as much as anyone
else's: that is every event read once more, where the follower needs only to know the
log grew (it reads what it has not applied itself).

The poll stays as the fall-back: a NOTIFY sent while the listening connection was down
is lost, so every wait ends after at most ``timeout`` seconds and the caller looks at
the log anyway. The listening connection uses the store's timeouts and TCP keepalives,
like every other connection of a coordinator: a restart or a terminated backend ends
the wait with an error (at once; a silent network within the keepalive time), the
caller looks at the log, and the next wait connects again (one attempt a second at
most) and, once connected, reports a wake-up, for whatever was committed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Final, Self

import psycopg
from psycopg import sql

from coordinator.store.eventsourcing_internals import notification_channel
from coordinator.store.eventstore import EventStore, PostgresTimeouts

__all__ = ["LogWatch"]

log = logging.getLogger("sessionbus.coordinator.watch")

_PAUSE_AFTER_FAILURE: Final = 1.0


class LogWatch:
    """``await wait(timeout)``: returns when the log may have grown (True) or after
    ``timeout`` seconds (False). LISTEN/NOTIFY on PostgreSQL, a plain sleep on the
    stores other processes cannot write to while this one runs (SQLite, memory)."""

    def __init__(self, store: EventStore) -> None:
        settings = store.settings
        recorder = store.recorder
        self._dsn = settings.postgres_dsn
        self._timeouts = settings.postgres_timeouts or PostgresTimeouts()
        self._channel = notification_channel(recorder) if self._dsn else None
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._failing = False
        self.wakeups = 0  # waits ended by a NOTIFY (or a new listening connection)

    @property
    def listens(self) -> bool:
        """Whether this store can wake a follower (PostgreSQL)."""
        return self._channel is not None

    @property
    def backend_pid(self) -> int | None:
        """The listening connection's server process, while it is connected."""
        return None if self._conn is None else self._conn.info.backend_pid

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait(self, timeout: float) -> bool:
        if self._channel is None:
            await asyncio.sleep(timeout)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if self._conn is None:
                async with asyncio.timeout_at(deadline):
                    self._conn = await self._listen(self._channel)
                if self._failing:
                    log.warning("listening to the store's notifications again")
                    self._failing = False
                self.wakeups += 1
                return True  # what was committed while nobody listened
            woken = await self._notified(self._conn, max(0.0, deadline - loop.time()))
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if not isinstance(exc, TimeoutError) and not self._failing:
                # Once per outage: the poll follows the log meanwhile.
                log.warning("not listening to the store's notifications: %s", exc)
                self._failing = True
            await self._drop()
            # Then the caller looks at the log (a NOTIFY may have been lost), and the
            # next wait connects again: at most one attempt a second while it fails.
            await asyncio.sleep(min(_PAUSE_AFTER_FAILURE, max(0.0, deadline - loop.time())))
            return False
        if woken:
            self.wakeups += 1
        return woken

    async def _listen(self, channel: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
        assert self._dsn is not None
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, **self._timeouts.connection_kwargs()
        )
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        return conn

    @staticmethod
    async def _notified(conn: psycopg.AsyncConnection[tuple[object, ...]], timeout: float) -> bool:
        """Wait for one notification, then take the others already here: one commit
        of many, or many commits at once, are one wake-up."""
        woken = False
        async for _ in conn.notifies(timeout=timeout, stop_after=1):
            woken = True
        if woken:
            async for _ in conn.notifies(timeout=0):
                pass
        return woken

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def close(self) -> None:
        await self._drop()
