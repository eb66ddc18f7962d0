"""One leader per store: who runs the outbox relay, fires timeouts and reports module
health loss when several coordinators share one PostgreSQL store.

Leadership is a PostgreSQL session-level advisory lock held on a connection of its
own: it is released by the database the moment the holder's session ends (crash, kill,
network loss), and another coordinator's next try takes it. Nothing home-made: the
database is the arbiter. An SQLite or in-memory store has one coordinator, always the
leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from coordinator.store import StoreSettings

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
    ) -> None:
        self.settings = settings
        self.key = f"sessionbus:{settings.postgres_schema or 'public'}:{name}"
        self.on_change = on_change
        self.interval = interval
        self.is_leader = False
        self._task: asyncio.Task[None] | None = None
        self._connection: Any = None
        self.terms = 0

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
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _run(self) -> None:
        dsn = self.settings.postgres_dsn
        assert dsn is not None
        while True:
            try:
                if self._connection is None:
                    self._connection = await psycopg.AsyncConnection.connect(
                        dsn, autocommit=True, connect_timeout=5
                    )
                if self.is_leader:
                    # Still ours while the session lives; a failed round trip means
                    # the session (and with it the lock) may be gone.
                    await self._connection.execute("SELECT 1")
                else:
                    cursor = await self._connection.execute(
                        "SELECT pg_try_advisory_lock(hashtext(%s))", (self.key,)
                    )
                    row = await cursor.fetchone()
                    if row is not None and row[0]:
                        await self._become(True)
            except (psycopg.Error, OSError) as exc:
                log.warning("leadership connection failed: %s", exc)
                await self._drop_connection()
                await self._become(False)
            await asyncio.sleep(self.interval)
