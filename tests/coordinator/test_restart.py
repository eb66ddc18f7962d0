"""Restarting the coordinator: projections come back identical, whether from the
persisted checkpoint (fast), from a stale checkpoint plus the tail of the log, or from
a full replay of the notification log, and all three agree."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from contracts import (
    ErrorCode,
    ModuleSessionConfig,
    SessionStatus,
    StandardError,
    WorkflowConfig,
)
from coordinator.domain import compact
from coordinator.domain.clock import ManualClock
from coordinator.read.projections import (
    CHECKPOINT_FORMAT,
    Projections,
    ProjectionSnapshot,
    _checkpoint_decoder,
    _checkpoint_encoder,
)
from coordinator.service.coordinator import SessionCoordinator
from tests.coordinator.conftest import Backend
from tests.coordinator.support import position

S = SessionStatus
CHECKPOINT = "projections"


async def _build_varied(coordinator: SessionCoordinator, clock: ManualClock) -> list[uuid.UUID]:
    """About forty sessions in every state the rules can reach, with module sessions in
    varied states, orphans from cleanup timeouts and a repaired one."""
    await coordinator.register_module("executor", required=True)
    await coordinator.register_module("ai-integration", required=True)
    await coordinator.register_module("task-loop", required=False)
    await coordinator.register_module("frontend-api", required=False)
    await coordinator.unregister_module("frontend-api")
    ids: list[uuid.UUID] = []
    fast = WorkflowConfig(link_timeout_ms=50_000, cleanup_timeout_ms=20_000)

    async def new(config: WorkflowConfig = fast) -> uuid.UUID:
        clock.advance(milliseconds=7)
        sid = (await coordinator.create_workflow_session(["s1", "s2"], config)).session_id
        ids.append(sid)
        return sid

    async def active(*optional: str) -> uuid.UUID:
        sid = await new()
        await coordinator.link_module_session(sid, "executor", uuid.uuid4())
        await coordinator.link_module_session(sid, "ai-integration", uuid.uuid4())
        for module_id in optional:
            await coordinator.link_module_session(sid, module_id, uuid.uuid4())
        return sid

    for i in range(4):
        sid = await new()  # INITIALIZING, partly linked
        if i % 2:
            await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    for i in range(6):
        sid = await active(*(["task-loop"] if i % 2 else []))
        if i % 3 == 0:
            await coordinator.record_activity(sid, "executor")
        if i == 5:
            await coordinator.update_session_status(sid, S.PAUSED, module_id="task-loop")
    for status in (S.PAUSED, S.COMPLETED, S.CANCELLED, S.FAILED):
        for _ in range(2):
            sid = await active("task-loop")
            await coordinator.update_session_status(sid, status)
    for _ in range(3):  # destroyed by unlinking
        sid = await active()
        await coordinator.destroy_workflow_session(sid)
        await coordinator.unlink_module_session(sid, "executor")
        await coordinator.unlink_module_session(sid, "ai-integration")
    for _ in range(2):  # optional module timed out
        sid = await new(WorkflowConfig(required_modules=[], link_timeout_ms=50_000))
        await coordinator.link_module_session(
            sid, "task-loop", uuid.uuid4(), config=ModuleSessionConfig(timeout_ms=1_000)
        )
    for _ in range(3):  # cleanup timeout ahead: destroyed with orphans
        sid = await active("task-loop")
        await coordinator.destroy_workflow_session(sid)
    link_timeouts = [await new(WorkflowConfig(link_timeout_ms=20_000)) for _ in range(3)]
    clock.advance(seconds=25)
    await coordinator.run_timeouts()
    for sid in link_timeouts:
        timed_out = await coordinator.get_workflow_session(sid)
        assert timed_out is not None
        assert timed_out.destroyed
    # Orphans: one repaired, the others left for the integrity report.
    orphaned = [sid for sid in ids if coordinator.projections.orphans.get(sid)]
    assert len(orphaned) >= 3
    await coordinator.repair_session_integrity(orphaned[0])
    # Sessions whose timers are still running at the restart.
    for _ in range(3):  # CLEANUP, waiting for modules
        sid = await active("task-loop")
        await coordinator.destroy_workflow_session(sid)
        await coordinator.unlink_module_session(sid, "executor")
    for _ in range(2):  # failed by a module error, then CLEANUP
        sid = await active()
        error = StandardError(code=ErrorCode.INTERNAL, message="boom", module_id="executor")
        await coordinator.report_error(sid, error, module_id="executor")
    for _ in range(2):
        await new()
    return ids


def _normalized(snapshot: ProjectionSnapshot) -> dict[str, Any]:
    """The snapshot with its sets in a canonical order."""
    return {
        "position": snapshot.position,
        "sessions": {s.session_id: s for s in snapshot.sessions},
        "destroyed": snapshot.destroyed,
        "modules": snapshot.modules,
        "orphans": snapshot.orphans,
        "commands": dict(snapshot.commands),
    }


async def _observed(coordinator: SessionCoordinator, ids: list[uuid.UUID]) -> dict[str, Any]:
    """Everything a client can read about the sessions."""
    health = await coordinator.get_coordinator_health()
    return {
        "sessions": {sid: await coordinator.get_workflow_session(sid) for sid in ids},
        "linked": {sid: coordinator.get_linked_sessions(sid) for sid in ids},
        "integrity": {sid: await coordinator.validate_session_integrity(sid) for sid in ids},
        "active": coordinator.list_active_workflow_sessions(),
        "by_status": {s: coordinator.list_active_workflow_sessions(s) for s in S},
        "by_module": {
            m: coordinator.list_active_workflow_sessions(module_id=m)
            for m in ("executor", "ai-integration", "task-loop")
        },
        "health": msgspec.structs.replace(health, last_health_check=None),
        "modules": coordinator.list_modules(),
    }


async def test_restart_from_checkpoint_and_from_full_replay_agree(
    backend: Backend, clock: ManualClock
) -> None:
    """close() checkpoints the projections; reopening resumes from that checkpoint
    (replaying nothing) with identical projections and reads. Without the checkpoint,
    a full replay of the log gives the same again."""
    async with SessionCoordinator(backend.url, clock=clock) as live:
        ids = await _build_varied(live, clock)
        expected = _normalized(live.projections.snapshot())
        seen = await _observed(live, ids)
        total = position(live)
    assert expected["position"] == total
    assert expected["destroyed"] == 9
    assert expected["orphans"]
    checkpoint = backend.checkpoint(CHECKPOINT)
    assert checkpoint is not None
    assert checkpoint[0] == total

    async with SessionCoordinator(backend.url, clock=clock) as from_checkpoint:
        assert from_checkpoint.rebuilt_events == 0
        # States written unpacked (the live coordinator's hot ones) are packed again.
        held = from_checkpoint.projections.sessions._data.values()
        assert all(isinstance(value, tuple) for value in held)
        assert _normalized(from_checkpoint.projections.snapshot()) == expected
        assert await _observed(from_checkpoint, ids) == seen

    backend.delete_checkpoint(CHECKPOINT)
    async with SessionCoordinator(backend.url, clock=clock) as replayed:
        assert replayed.rebuilt_events == total
        assert _normalized(replayed.projections.snapshot()) == expected
        assert await _observed(replayed, ids) == seen


async def test_a_checkpoint_of_another_format_is_set_aside(
    backend: Backend, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint this version cannot read — another layout (the earlier map of
    unpacked states), another format number, or bytes that are not msgpack — is
    logged and the history folded instead: the same projections, nothing lost."""
    async with SessionCoordinator(backend.url, clock=clock) as live:
        ids = await _build_varied(live, clock)
        expected = _normalized(live.projections.snapshot())
        seen = await _observed(live, ids)
        earlier = msgspec.msgpack.encode(live.projections.snapshot())
        newer = msgspec.msgpack.decode(live.projections.encode_snapshot())
    total = expected["position"]
    newer[0] = CHECKPOINT_FORMAT + 1
    for data in (
        earlier,
        msgspec.msgpack.encode(newer),
        b"\xc1 not msgpack",
    ):
        backend.put_checkpoint(CHECKPOINT, total, data)
        caplog.clear()
        async with SessionCoordinator(backend.url, clock=clock) as restarted:
            assert restarted.rebuilt_events == total
            assert _normalized(restarted.projections.snapshot()) == expected
            assert await _observed(restarted, ids) == seen
        assert "projection checkpoint unreadable" in caplog.text


async def test_a_checkpoint_packed_with_other_module_numbers_is_renumbered(
    backend: Backend, clock: ManualClock
) -> None:
    """Packed states number module ids by the writing process's table; a process that
    numbered them otherwise renumbers them on reading (here: every number reversed)."""
    async with SessionCoordinator(backend.url, clock=clock) as live:
        ids = await _build_varied(live, clock)
        live.projections.sessions.compact()
        expected = _normalized(live.projections.snapshot())
        snap = _checkpoint_decoder.decode(live.projections.encode_snapshot())
    assert any(isinstance(value, bytes) for _sid, value in snap.sessions)
    theirs = list(reversed(snap.names))
    to_theirs = [theirs.index(name) for name in snap.names]
    foreign = msgspec.structs.replace(
        snap,
        names=theirs,
        sessions=[
            (sid, compact.renumber(v, to_theirs) if isinstance(v, bytes) else v)
            for sid, v in snap.sessions
        ],
    )
    assert foreign.sessions != snap.sessions
    restored = Projections.decode_snapshot(_checkpoint_encoder.encode(foreign))
    assert _normalized(restored.snapshot()) == expected
    assert [restored.linked_sessions(sid) for sid in ids] == [
        live.get_linked_sessions(sid) for sid in ids
    ]


async def test_restart_from_a_periodic_checkpoint_replays_only_the_tail(
    backend: Backend, clock: ManualClock
) -> None:
    """A crash after a periodic checkpoint (checkpoint_every) loses nothing: the
    checkpoint plus the events logged after it rebuild the projections the live
    coordinator had, replaying only those events."""
    async with SessionCoordinator(backend.url, clock=clock, checkpoint_every=40) as live:
        ids = await _build_varied(live, clock)
        periodic = backend.checkpoint(CHECKPOINT)
        # The tail: events after the last periodic checkpoint.
        for _ in range(3):
            await live.record_activity(ids[-1])
        expected = _normalized(live.projections.snapshot())
        seen = await _observed(live, ids)
    assert periodic is not None
    position, data = periodic
    assert 40 <= position < expected["position"]
    # The crash: close() never wrote its final checkpoint.
    backend.put_checkpoint(CHECKPOINT, position, data)

    async with SessionCoordinator(backend.url, clock=clock) as resumed:
        assert resumed.rebuilt_events == expected["position"] - position
        assert _normalized(resumed.projections.snapshot()) == expected
        assert await _observed(resumed, ids) == seen


async def test_a_restarted_coordinator_keeps_applying_the_rules(
    backend: Backend, clock: ManualClock
) -> None:
    """After a restart the writer works on restored state: a waiting session activates
    when its last module links, a session in CLEANUP is destroyed on its last unlink,
    and list_active reflects both."""
    async with SessionCoordinator(backend.url, clock=clock) as first:
        await first.register_module("executor")
        waiting = (await first.create_workflow_session()).session_id
        cleaning = (await first.create_workflow_session()).session_id
        await first.link_module_session(cleaning, "executor", uuid.uuid4())
        await first.destroy_workflow_session(cleaning)
    async with SessionCoordinator(backend.url, clock=clock) as second:
        await second.link_module_session(waiting, "executor", uuid.uuid4())
        await second.unlink_module_session(cleaning, "executor")
        woken = await second.get_workflow_session(waiting)
        gone = await second.get_workflow_session(cleaning)
        assert woken is not None
        assert woken.status is S.ACTIVE
        assert gone is not None
        assert gone.destroyed
        assert second.list_active_workflow_sessions() == [waiting]
