"""Where the store goes past eventsourcing's documented API, and why.

Everything else in ``coordinator.store.eventstore`` uses the library as documented (an
``Application`` with its ``repository`` and snapshot store, a ``Mapper`` subclass,
events built by their constructors, aggregates handing out events by
``collect_events``, the recorders' abstract methods). These four do not, for the
reasons given with each; ``tests/coordinator/test_eventsourcing_internals.py`` pins the
library behaviour they rely on, so a release that changes it fails a test rather than
the store. Written against eventsourcing 9.5 (``pyproject.toml`` pins ``>=9.5,<9.6``)
and psycopg_pool 3.3.

1. ``record``: the writer's group commit records the collected events with the
   application's event store (``Application.events.put``), which is what
   ``Application.save`` does for this application, minus two runtime-checkable
   ``Protocol`` ``isinstance`` checks per aggregate. On Python 3.11 those checks walk
   the protocols' members every time: they add more than half again to the CPU the
   store spends recording a pass (measured A/B in one process), which every command
   pays.

2. ``select_states``: a replay reads (position, stored state) pairs straight from the
   recorder's table through the recorder's own connections. The public
   ``ApplicationRecorder.select_notifications`` builds a ``Notification`` per row and
   parses every originator id into a UUID, which takes a replay down to about half
   its rate (``benchmarks/rebuild.py``), and a rebuild must keep pace with the bare
   select-and-decode. It also selects one partition of the streams in SQL, which the
   public selection (by topic only) cannot.

3. ``notification_channel``: eventsourcing's PostgreSQL recorder sends ``NOTIFY`` on a
   channel of its own in every transaction that inserts events, and keeps the channel's
   name in an attribute; ``coordinator.store.watch`` LISTENs on it to follow other
   coordinators' commits. Neither is documented.

4. ``PostgresFactory``: eventsourcing's PostgreSQL datastore takes no libpq
   parameters beyond the address and the credentials, and no pool reconnect timeout,
   so the store's (``coordinator.store.eventstore.PostgresTimeouts``: keepalives, TCP
   user timeout, connect and statement timeouts) are added to the pool the library
   built, before the pool opens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final
from uuid import UUID

import msgspec
import psycopg_pool
from eventsourcing.application import Application
from eventsourcing.domain import CollectEventsProtocol
from eventsourcing.persistence import (
    ApplicationRecorder,
    InterfaceError,
    OperationalError,
    Recording,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.postgres import PostgresFactory as _LibraryPostgresFactory
from eventsourcing.sqlite import SQLiteApplicationRecorder
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_fixed,
    wait_random,
)

from coordinator.errors import ConfigurationError

__all__ = [
    "POOL_ENV",
    "PoolSettings",
    "PostgresFactory",
    "notification_channel",
    "record",
    "select_states",
]

# The key of the encoded ``PoolSettings`` in the application's environment (the one
# eventsourcing's factories read; not a process setting, so not a SESSIONBUS_ name).
POOL_ENV: Final = "COORDINATOR_POSTGRES_POOL"

# A partition is ``(id.int & 15) % count == index``: the low four bits of the stream id,
# which is the last hex digit of both stores' text form of it.
_SQLITE_PART: Final = " AND (instr('0123456789abcdef', substr(originator_id, -1)) - 1) % ? = ?"
_POSTGRES_PART: Final = (
    " AND (position(right(originator_id::text, 1) in '0123456789abcdef') - 1) %% %s = %s"
)


def record(
    app: Application[UUID], aggregates: Iterable[CollectEventsProtocol]
) -> list[Recording[UUID]]:
    """``app.save(*aggregates)`` without its per-aggregate ``Protocol`` checks: every
    pending event of ``aggregates``, in order, recorded in one transaction. The same as
    ``save`` only while ``app`` keeps no aggregate cache, sets no snapshotting
    intervals and does nothing on ``notify``, as the store's application does."""
    return app.events.put(
        [event for aggregate in aggregates for event in aggregate.collect_events()]
    )


def select_states(
    recorder: ApplicationRecorder,
    after: int,
    limit: int | None,
    until: int,
    part: tuple[int, int] | None = None,
) -> Sequence[tuple[int, bytes]] | None:
    """(position, stored state) of the events with ``after < position <= until``, in
    order, at most ``limit`` (``None``: all), only those of partition ``part``
    (``(index, count)``) if given. ``None`` for a recorder this does not know (the
    in-memory one): the caller reads through ``select_notifications`` instead."""
    if isinstance(recorder, SQLiteApplicationRecorder):
        return _select_sqlite(recorder, after, limit, until, part)
    if isinstance(recorder, PostgresApplicationRecorder):
        return _select_postgres(recorder, after, limit, until, part)
    return None


def _select_sqlite(
    recorder: SQLiteApplicationRecorder,
    after: int,
    limit: int | None,
    until: int,
    part: tuple[int, int] | None,
) -> Sequence[tuple[int, bytes]]:
    # The notification id is the table's rowid; the originator id is 32 hex digits.
    where = "rowid > ? AND rowid <= ?"
    args: tuple[int, ...] = (after, until)
    if part is not None:
        where += _SQLITE_PART
        args += (part[1], part[0])
    table = recorder.events_table_name  # the library's own name, not input
    statement = f"SELECT rowid, state FROM {table} WHERE {where} ORDER BY rowid LIMIT ?"  # noqa: S608
    with recorder.datastore.transaction(commit=False) as cursor:
        cursor.execute(statement, (*args, -1 if limit is None else limit))
        # sqlite3.Row objects, used as (position, state) pairs: not copied into tuples.
        rows: Sequence[tuple[int, bytes]] = cursor.fetchall()
        return rows


# As eventsourcing retries its own PostgreSQL reads (10 tries, 0.2 s apart): a
# connection the database ended fails once, the pool drops it, the next try gets
# another.
@retry(
    retry=retry_if_exception_type((InterfaceError, OperationalError)),
    stop=stop_after_attempt(10),
    wait=wait_fixed(0.2) + wait_random(0, 0.02),
    reraise=True,
)
def _select_postgres(
    recorder: PostgresApplicationRecorder,
    after: int,
    limit: int | None,
    until: int,
    part: tuple[int, int] | None,
) -> list[tuple[int, bytes]]:
    where = "notification_id > %s AND notification_id <= %s"
    args: tuple[int, ...] = (after, until)
    if part is not None:
        where += _POSTGRES_PART
        args += (part[1], part[0])
    statement = SQL(
        "SELECT notification_id, state FROM {schema}.{table} "
        "WHERE {where} ORDER BY notification_id LIMIT %s"
    ).format(
        schema=Identifier(recorder.datastore.schema),
        table=Identifier(recorder.events_table_name),
        where=SQL(where),  # one of the literals above
    )
    # Binary results: bytea as text is hex, twice the bytes to send and parse. The
    # library's connection context maps psycopg's errors to its own (retried above).
    with (
        recorder.datastore.get_connection() as conn,
        conn.cursor(row_factory=tuple_row, binary=True) as cursor,
    ):
        cursor.execute(statement, (*args, limit), prepare=True)
        return [(position, bytes(state)) for position, state in cursor.fetchall()]


def notification_channel(recorder: ApplicationRecorder) -> str | None:
    """The channel the recorder NOTIFYs in every transaction that inserts events;
    ``None`` but for PostgreSQL."""
    if isinstance(recorder, PostgresApplicationRecorder):
        channel: str = recorder.channel_name
        return channel
    return None


class PoolSettings(msgspec.Struct, frozen=True):
    """What ``PostgresFactory`` adds to the library's pool: libpq keywords for every
    connection, and how long to try to replace a lost one."""

    kwargs: dict[str, Any]
    reconnect_timeout: float

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()


class PostgresFactory(_LibraryPostgresFactory):
    """eventsourcing's PostgreSQL factory, with the ``PoolSettings`` found under
    ``POOL_ENV`` applied to the pool its datastore built. Named by
    ``PERSISTENCE_MODULE``."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        encoded = self.env.get(POOL_ENV)
        if not encoded:
            return
        settings = msgspec.json.decode(encoded, type=PoolSettings)
        pool = self.datastore.pool
        # psycopg_pool reads ``kwargs`` for every connection it makes and
        # ``reconnect_timeout`` whenever it replaces a lost one; the datastore opens
        # the pool on first use, so both are in place before any connection is made.
        if not isinstance(pool, psycopg_pool.ConnectionPool) or not isinstance(pool.kwargs, dict):
            raise ConfigurationError(
                "the installed eventsourcing's PostgreSQL datastore keeps no psycopg_pool "
                f"ConnectionPool with a kwargs dict (found {type(pool).__name__}): "
                f"{__name__} was written for eventsourcing 9.5"
            )
        pool.kwargs.update(settings.kwargs)
        pool.reconnect_timeout = settings.reconnect_timeout
