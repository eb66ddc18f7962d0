"""The single writer under faults: an unavailable store and a second writer on the same
store (optimistic concurrency). Commands get typed, retryable errors or are re-applied
on fresh state, and due timeouts are never lost."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from contracts import (
    Accepted,
    CommandRequest,
    ErrorCode,
    EventEnvelope,
    LinkModuleSession,
    SessionStatus,
    WorkflowConfig,
)
from coordinator.domain.aggregates import EnvelopeAggregate
from coordinator.domain.clock import ManualClock
from coordinator.errors import StoreUnavailable
from coordinator.service.coordinator import SessionCoordinator
from tests.coordinator.support import event_types, rejection

S = SessionStatus


def _conflicts(caplog: pytest.LogCaptureFixture) -> int:
    """How many version conflicts the writer has met (it logs each one)."""
    return sum("version conflict" in r.getMessage() for r in caplog.records)


class FlakyStore:
    """Wraps ``EventStore.save`` so a test can take the database away and back."""

    def __init__(self, coordinator: SessionCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
        store = coordinator.store
        assert store is not None
        self._save = store.save
        self.down = False
        self.refused = 0
        monkeypatch.setattr(store, "save", self.save)

    def save(self, aggregates: Sequence[EnvelopeAggregate]) -> list[EventEnvelope]:
        if self.down:
            self.refused += 1
            raise StoreUnavailable("database is restarting")
        return self._save(aggregates)


async def test_commands_during_a_store_outage_get_retryable_errors_and_store_nothing(
    coordinator: SessionCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store refuses writes every write command is answered STORE_UNAVAILABLE
    (retryable) and leaves no trace, in the store or the projections; afterwards the
    same commands succeed."""
    sid = (await coordinator.create_workflow_session()).session_id
    flaky = FlakyStore(coordinator, monkeypatch)
    store = coordinator.store
    assert store is not None
    before = store.max_position()
    flaky.down = True
    rejected = await rejection(
        coordinator.update_session_status(sid, S.PAUSED), ErrorCode.STORE_UNAVAILABLE
    )
    assert rejected.retryable
    await rejection(coordinator.create_workflow_session(), ErrorCode.STORE_UNAVAILABLE)
    assert store.max_position() == before
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is S.ACTIVE
    assert len(coordinator.list_active_workflow_sessions()) == 1

    flaky.down = False
    accepted = await coordinator.update_session_status(sid, S.PAUSED)
    assert accepted == Accepted(session_id=sid, version=3, events=1)
    assert (await coordinator.verify_history(sid)).ok


async def test_a_timeout_whose_commit_failed_fires_once_the_store_is_back(
    coordinator: SessionCoordinator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A due inactivity timeout whose events could not be saved is not dropped: it is
    tried again after a short back-off (not in a tight loop against the failing store)
    and fires once the store accepts writes."""
    sid = (
        await coordinator.create_workflow_session(config=WorkflowConfig(timeout_ms=1_000))
    ).session_id
    flaky = FlakyStore(coordinator, monkeypatch)
    flaky.down = True
    clock.advance(seconds=2)
    await rejection(coordinator.run_timeouts(), ErrorCode.STORE_UNAVAILABLE)
    assert flaky.refused == 1
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is S.ACTIVE
    await coordinator.run_timeouts()
    assert flaky.refused == 1, "retried at once against a store that is down"

    flaky.down = False
    clock.advance(seconds=1)
    await coordinator.run_timeouts()
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.destroyed
    assert session.failure is not None
    assert session.failure.code is ErrorCode.INACTIVITY_TIMEOUT


async def test_a_second_writer_on_the_same_store_is_detected_and_commands_reapplied(
    store_url: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two coordinators on one store: when one has appended to a session the other
    holds in its cache, the other's next save conflicts; it reloads and re-applies the
    command on fresh state, so nothing is lost or duplicated and the chain holds.
    (Log following is off here, so the conflict path itself is what is exercised.)"""
    async with SessionCoordinator(store_url, clock=clock, follow_log=False) as first:
        await first.register_module("task-loop", required=False)
        sid = (await first.create_workflow_session()).session_id  # cached in first
        async with SessionCoordinator(store_url, clock=clock) as second:
            await second.link_module_session(sid, "task-loop", uuid.uuid4())
        # first's cached session is one version behind the store.
        accepted = await first.update_session_status(sid, S.PAUSED)
        assert _conflicts(caplog) == 1
        assert accepted == Accepted(session_id=sid, version=4, events=1)
        session = await first.get_workflow_session(sid)
        assert session is not None
        assert session.status is S.PAUSED
        assert list(session.modules) == ["task-loop"]
        assert (await first.verify_history(sid)).ok
        assert await event_types(first, sid) == [
            "session.created",
            "session.status-changed",
            "session.linked",
            "session.status-changed",
        ]
        # A command the fresh state no longer allows gets its own error.
        async with SessionCoordinator(store_url, clock=clock) as third:
            await third.update_session_status(sid, S.CANCELLED)
        await rejection(first.update_session_status(sid, S.ACTIVE), ErrorCode.INVALID_TRANSITION)


async def test_a_timeout_computed_on_stale_state_is_recomputed_after_a_conflict(
    store_url: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout that fires on a cached session another writer has since advanced
    conflicts on save; after reloading, the timeout is judged again on the fresh state
    (the other writer's activity postponed it) and still fires when really due."""
    async with SessionCoordinator(store_url, clock=clock, follow_log=False) as first:
        sid = (
            await first.create_workflow_session(config=WorkflowConfig(timeout_ms=1_000))
        ).session_id
        clock.advance(milliseconds=900)
        async with SessionCoordinator(store_url, clock=clock) as second:
            await second.record_activity(sid)
        clock.advance(milliseconds=200)  # due by first's stale state, not by the store
        await first.run_timeouts()
        assert _conflicts(caplog) == 1
        session = await first.get_workflow_session(sid)
        assert session is not None
        assert session.status is S.ACTIVE
        clock.advance(milliseconds=800)  # 1 000 ms after second's activity
        await first.run_timeouts()
        session = await first.get_workflow_session(sid)
        assert session is not None
        assert session.destroyed
        assert session.failure is not None
        assert session.failure.code is ErrorCode.INACTIVITY_TIMEOUT
        assert (await first.verify_history(sid)).ok


async def test_a_writer_following_the_log_sees_another_writer_before_it_writes(
    store_url: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With log following (the default), a writer reads what another coordinator
    appended before its next pass: its stale cached session is dropped, the command is
    applied on fresh state without a conflict, and the other's command ids are known."""
    async with SessionCoordinator(store_url, clock=clock) as first:
        await first.register_module("task-loop", required=False)
        sid = (await first.create_workflow_session()).session_id
        request = CommandRequest(
            command_id=uuid.uuid4(),
            issued_at=clock.now(),
            command=LinkModuleSession(
                session_id=sid, module_id="task-loop", module_session_id=uuid.uuid4()
            ),
        )
        async with SessionCoordinator(store_url, clock=clock) as second:
            linked = await second.execute(request)
        accepted = await first.update_session_status(sid, S.PAUSED)
        assert _conflicts(caplog) == 0
        assert accepted == Accepted(session_id=sid, version=4, events=1)
        assert first._writer is not None
        assert first._writer.foreign_events >= 1
        # The other coordinator's command, retried here, is answered, not re-applied.
        again = await first.execute(request)
        assert again == linked
        assert await event_types(first, sid) == [
            "session.created",
            "session.status-changed",
            "session.linked",
            "session.status-changed",
        ]
