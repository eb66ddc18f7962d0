"""A coordinator whose store is away, seen from the bus: every command is requeued
once, then answered with a retryable STORE_UNAVAILABLE (logged once per refusal); the
client retries within its attempts, then raises ``StoreUnavailable``; nothing is
stored or acknowledged as stored, and the same calls succeed once the store is back."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from contracts import ErrorCode, EventEnvelope
from coordinator.domain.aggregates import EnvelopeAggregate
from coordinator.errors import StoreFull, StoreLocked
from module_sdk import CoordinatorUnavailable, StoreUnavailable
from tests.bus.conftest import Bus


class DiskFull:
    """``EventStore.save`` and ``history`` refuse, as on a full disk, while ``on``."""

    def __init__(self, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.refused = 0
        self._save = store.save
        self._history = store.history
        monkeypatch.setattr(store, "save", self.save)
        monkeypatch.setattr(store, "history", self.history)

    def _check(self) -> None:
        if self.on:
            self.refused += 1
            raise StoreFull("database or disk is full")

    def save(self, aggregates: Sequence[EnvelopeAggregate]) -> list[EventEnvelope]:
        self._check()
        return self._save(aggregates)  # type: ignore[no-any-return]

    def history(self, session_id: Any) -> list[EventEnvelope]:
        self._check()
        return self._history(session_id)  # type: ignore[no-any-return]


async def test_a_store_outage_is_a_typed_retryable_refusal_end_to_end(
    bus: Bus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three attempts of one create while the disk is full: each delivery is requeued
    once and then refused, so the writer sees six and the log has three refusal lines;
    the client raises ``StoreUnavailable`` (a ``CoordinatorUnavailable``) carrying the
    last refusal. A read that needs the store fails the same way. Afterwards the
    same client call succeeds and the store holds exactly one new session."""
    async with bus.runtime(store=f"sqlite:///{tmp_path / 'events.sqlite'}") as runtime:
        client = await bus.client(timeout=10.0, attempts=3)
        sid = (await client.create_workflow_session()).session_id
        store = runtime.coordinator.store
        assert store is not None
        before = await asyncio.to_thread(store.max_position)
        full = DiskFull(store, monkeypatch)
        full.on = True
        with (
            caplog.at_level(logging.WARNING, "sessionbus.coordinator"),
            pytest.raises(StoreUnavailable) as info,
        ):
            await client.create_workflow_session()
        assert isinstance(info.value, CoordinatorUnavailable)
        assert info.value.error.code is ErrorCode.STORE_UNAVAILABLE
        assert info.value.error.retryable
        assert info.value.error.details == {"reason": "full"}
        assert full.refused == 6  # 3 attempts, each requeued once
        assert runtime.server.refused == 3
        refusals = [
            r
            for r in caplog.records
            if r.name == "sessionbus.coordinator.server" and "refused" in r.getMessage()
        ]
        assert len(refusals) == 3
        assert all("CreateWorkflowSession" in r.getMessage() for r in refusals)
        # The writer logs the outage once, not once per pass.
        outage = [r for r in caplog.records if r.name == "sessionbus.coordinator.writer"]
        assert len(outage) == 1
        assert await asyncio.to_thread(store.max_position) == before

        with pytest.raises(StoreUnavailable):
            await client.get_session_history(sid)

        full.on = False
        created = await client.create_workflow_session()
        assert created.session_id != sid
        assert len(await client.list_active_workflow_sessions()) == 2
        after = await asyncio.to_thread(store.max_position)
        history = await client.get_session_history(created.session_id)
        assert after - before == len(history.events)


async def test_a_second_coordinator_on_the_same_sqlite_file_is_refused(
    bus: Bus, tmp_path: Path
) -> None:
    """A SQLite store has one coordinator: a second one on the same file fails to
    start with ``StoreLocked`` naming the holder, and starts once the first is gone."""
    store = f"sqlite:///{tmp_path / 'events.sqlite'}"
    async with bus.runtime(store=store) as first:
        client = await bus.client()
        await client.create_workflow_session()
        second = bus.runtime(store=store)
        with pytest.raises(StoreLocked) as info:
            await second.start()
        assert f"pid {os.getpid()}" in str(info.value)
        assert "another coordinator" in str(info.value)
        # The first one is untouched by the attempt.
        await client.create_workflow_session()
        assert len(first.coordinator.list_active_workflow_sessions()) == 2
    async with bus.runtime(store=store) as again:
        assert len(again.coordinator.list_active_workflow_sessions()) == 2
