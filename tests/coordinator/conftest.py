"""Fixtures of the coordinator-core suite: one store backend per parameter (SQLite file
and the real PostgreSQL), a manual clock, and a running coordinator on both.

Tests that take ``backend`` (or anything built on it) run once per backend, so the same
contract is proven on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.domain.clock import ManualClock
from coordinator.service.coordinator import SessionCoordinator


@dataclass(frozen=True)
class Backend:
    """A store URL plus direct SQL access to the tables behind it, for tests that must
    look at (or tamper with) what is stored, not at what the coordinator says."""

    name: str
    url: str
    sqlite_path: str | None = None
    pg_dsn: str | None = None
    pg_schema: str | None = None

    # eventsourcing names its tables differently per backend: SQLite uses fixed names,
    # PostgreSQL prefixes the application name ("sessionbus").
    @property
    def events_table(self) -> str:
        return "stored_events" if self.name == "sqlite" else f'"{self.pg_schema}".sessionbus_events'

    @property
    def snapshots_table(self) -> str:
        return (
            "stored_snapshots"
            if self.name == "sqlite"
            else f'"{self.pg_schema}".sessionbus_snapshots'
        )

    @property
    def checkpoints_table(self) -> str:
        return (
            "sessionbus_checkpoints"
            if self.name == "sqlite"
            else f'"{self.pg_schema}".sessionbus_checkpoints'
        )

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement with ``?`` placeholders; return the rows (if any)."""
        if self.name == "sqlite":
            assert self.sqlite_path is not None
            lite = sqlite3.connect(self.sqlite_path, timeout=10)
            try:
                with lite:
                    rows = lite.execute(statement, params).fetchall()
            finally:
                lite.close()
            return rows
        assert self.pg_dsn is not None
        query = statement.replace("?", "%s")
        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def _stream_key(self, stream_id: uuid.UUID) -> Any:
        # SQLite stores originator ids as 32 hex digits, PostgreSQL as uuid.
        return stream_id.hex if self.name == "sqlite" else stream_id

    def stored_state(self, stream_id: uuid.UUID, version: int) -> bytes:
        rows = self.sql(
            f"SELECT state FROM {self.events_table} "
            "WHERE originator_id = ? AND originator_version = ?",
            (self._stream_key(stream_id), version),
        )
        assert len(rows) == 1, f"no stored event {stream_id} v{version}"
        return bytes(rows[0][0])

    def tamper(self, stream_id: uuid.UUID, version: int, mutate: Callable[[bytes], bytes]) -> None:
        """Rewrite one stored event's bytes in place, behind the store's back."""
        old = self.stored_state(stream_id, version)
        new = mutate(old)
        assert new != old
        self.sql(
            f"UPDATE {self.events_table} SET state = ? "
            "WHERE originator_id = ? AND originator_version = ?",
            (new, self._stream_key(stream_id), version),
        )

    def snapshot_versions(self, stream_id: uuid.UUID) -> list[int]:
        rows = self.sql(
            f"SELECT originator_version FROM {self.snapshots_table} "
            "WHERE originator_id = ? ORDER BY originator_version",
            (self._stream_key(stream_id),),
        )
        return [int(r[0]) for r in rows]

    def checkpoint_names(self) -> list[str]:
        rows = self.sql(f"SELECT name FROM {self.checkpoints_table} ORDER BY name")
        return [str(r[0]) for r in rows]

    def checkpoint(self, name: str) -> tuple[int, bytes] | None:
        rows = self.sql(
            f"SELECT position, data FROM {self.checkpoints_table} WHERE name = ?",
            (name,),
        )
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def put_checkpoint(self, name: str, position: int, data: bytes) -> None:
        self.sql(
            f"UPDATE {self.checkpoints_table} SET position = ?, data = ? WHERE name = ?",
            (position, data, name),
        )

    def delete_checkpoint(self, name: str) -> None:
        self.sql(f"DELETE FROM {self.checkpoints_table} WHERE name = ?", (name,))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The store backend under test: a SQLite file, or a fresh schema on the real
    PostgreSQL."""
    if request.param == "sqlite":
        path = str(tmp_path / "sessionbus.sqlite")
        return Backend("sqlite", f"sqlite:///{path}", sqlite_path=path)
    url: str = request.getfixturevalue("pg_store_url")
    return Backend(
        "postgres",
        url,
        pg_dsn=request.getfixturevalue("postgres_url"),
        pg_schema=request.getfixturevalue("pg_schema"),
    )


@pytest.fixture
def store_url(backend: Backend) -> str:
    """The store URL of the backend under test."""
    return backend.url


@pytest.fixture
def clock() -> ManualClock:
    """Time that moves only when a test advances it."""
    return ManualClock()


@pytest.fixture
async def coordinator(store_url: str, clock: ManualClock) -> AsyncIterator[SessionCoordinator]:
    """A running coordinator on the backend under test, closed afterwards."""
    async with SessionCoordinator(store_url, clock=clock) as running:
        yield running
