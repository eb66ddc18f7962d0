"""One leader per store: who runs the outbox relay, fires timeouts and reports module
health loss when several coordinators share one PostgreSQL store.

Leadership is a PostgreSQL session-level advisory lock held on a connection of its
own: it is released by the database the moment the holder's session ends (crash, kill,
a restart, a terminated backend), and another coordinator's next try takes it. An
SQLite or in-memory store has one coordinator, always the leader.

A holder cut off by a silent network (no reset, no reply) is the hard case: until the
database ends its session, it holds the lock, and until the holder notices, it goes on
publishing. The two are ordered by a lease:

- the holder checks its session every ``interval`` seconds, each check bounded by
  ``check_timeout``; it may publish only while the last check that succeeded was
  *sent* less than ``lease`` seconds ago (``holds_lease``), and steps down at the
  first failed or late check;
- its session tells the server to end it after ``release_after`` seconds without a
  query (``idle_session_timeout``), and the server's TCP keepalives and
  ``tcp_user_timeout`` on it are no shorter. Whatever ends the session on the
  database's side, it ends at least ``release_after`` after the last check the
  server answered, which is after that check was sent.

So with ``lease < release_after`` the lock is free only after the old holder's lease
has run out: by the time another coordinator can take it, the old one has stopped
publishing (``release_after - lease`` is the margin for a publish already under way).
What is left, a page published by both around the hand-over, consumers absorb by
per-session version; the relay checkpoint itself only moves forward in SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from coordinator.store.eventstore import PostgresTimeouts, StoreSettings

__all__ = ["Leadership"]

log = logging.getLogger("sessionbus.coordinator.leader")

OnChange = Callable[[bool], Awaitable[None]]


class Leadership:
    """Try, hold and lose the store's leadership; ``on_change(True|False)`` follows."""

    def __init__(
        self,
        settings: StoreSettings,
        name: str,
        on_change: OnChange,
        *,
        interval: float = 1.0,
        check_timeout: float = 2.0,
        lease: float = 5.0,
        release_after: float = 10.0,
    ) -> None:
        if not interval + check_timeout <= lease < release_after:
            raise ValueError(
                "leadership needs interval + check_timeout <= lease < release_after, not "
                f"{interval} + {check_timeout}, {lease}, {release_after}"
            )
        self.settings = settings
        self.key = f"sessionbus:{settings.postgres_schema or 'public'}:{name}"
        self.on_change = on_change
        self.interval = interval
        self.check_timeout = check_timeout
        self.lease = lease
        self.release_after = release_after
        self.is_leader = False
        self._task: asyncio.Task[None] | None = None
        self._connection: Any = None
        self._closing: set[asyncio.Future[Any]] = set()
        self._confirmed_at = 0.0  # when the last successful check was sent (monotonic)
        self.terms = 0

    def holds_lease(self) -> bool:
        """Whether this coordinator may publish now: it leads, and its last successful
        check was sent less than ``lease`` seconds ago (always, off PostgreSQL)."""
        if not self.is_leader:
            return False
        if self.settings.backend != "postgres":
            return True
        return time.monotonic() - self._confirmed_at < self.lease

    async def start(self) -> None:
        if self.settings.backend != "postgres":
            await self._become(True)
            return
        self._task = asyncio.create_task(self._run(), name="sessionbus-leadership")

    async def close(self) -> None:
        """Stop trying, give leadership up (closing the lock's session). Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop_connection()
        if self.is_leader:
            await self._become(False)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)

    async def _become(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if leader:
            self.terms += 1
        if leader:
            log.info("took leadership of %s", self.key)
        elif self._task is not None:
            log.warning("lost leadership of %s", self.key)
        await self.on_change(leader)

    async def _drop_connection(self) -> None:
        """Forget the lock's connection and close it in the background: a black-holed
        connection's goodbye (and psycopg's cancel of a query under way) would wait on
        the network."""
        connection, self._connection = self._connection, None
        if connection is not None:
            closing = asyncio.create_task(self._close_quietly(connection))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def _abandoned(self, check: asyncio.Future[Any]) -> None:
        self._closing.discard(check)
        if not check.cancelled():
            check.exception()  # retrieved: it was reported as a timeout already

    @staticmethod
    async def _close_quietly(connection: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 30)

    async def _connect(self) -> Any:
        dsn = self.settings.postgres_dsn
        assert dsn is not None
        timeouts = self.settings.postgres_timeouts or PostgresTimeouts()
        release = int(self.release_after)
        kwargs = timeouts.connection_kwargs()
        # The server ends this session ``release_after`` seconds after its last query,
        # and its TCP checks take no less (see the module docstring).
        kwargs["options"] = (
            f"-c statement_timeout={int(self.check_timeout * 1000)} "
            f"-c idle_session_timeout={release * 1000} "
            f"-c tcp_keepalives_idle={max(1, release - 4)} "
            "-c tcp_keepalives_interval=2 -c tcp_keepalives_count=2 "
            f"-c tcp_user_timeout={release * 1000}"
        )
        kwargs["connect_timeout"] = max(2, int(self.check_timeout))
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs)

    async def _check(self) -> bool:
        """One round: connect if needed, then confirm the lock (or try to take it).
        Whether this coordinator holds the lock now."""
        if self._connection is None:
            self._connection = await self._connect()
        sent = time.monotonic()
        if self.is_leader:
            # Still ours while the session lives; a failed or late round trip means
            # the session (and with it the lock) may be gone.
            await self._connection.execute("SELECT 1")
            self._confirmed_at = sent
            return True
        cursor = await self._connection.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s))", (self.key,)
        )
        row = await cursor.fetchone()
        if row is not None and row[0]:
            self._confirmed_at = sent
            return True
        return False

    async def _run(self) -> None:
        # Not a tenacity retry: a check every ``interval`` whether it succeeds or not
        # (the lease is renewed by the checks that succeed), with a new connection after
        # one that failed.
        failing = False
        while True:
            # Not ``wait_for``: it would wait for the check to finish cancelling, and
            # psycopg's cancel of a query talks to the server (which may be unreachable).
            check = asyncio.ensure_future(self._check())
            try:
                done, _ = await asyncio.wait({check}, timeout=self.check_timeout)
            except asyncio.CancelledError:
                check.cancel()  # closing: the check goes with the loop that ran it
                raise
            error: BaseException | None
            if done:
                error = check.exception()
            else:
                check.cancel()
                self._closing.add(check)
                check.add_done_callback(self._abandoned)
                error = TimeoutError(f"no answer within {self.check_timeout} s")
            if error is None:
                if failing:
                    log.warning("leadership connection restored")
                failing = False
                await self._become(check.result())
            elif isinstance(error, psycopg.Error | OSError | TimeoutError):
                # Once per outage, not once per try: the database may be away a while.
                if not failing:
                    log.warning("leadership connection failed: %s", error)
                failing = True
                await self._become(False)
                await self._drop_connection()
            else:
                raise error
            await asyncio.sleep(self.interval)
