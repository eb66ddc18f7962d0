"""A rebuild folded by several processes, each reading one partition of the log, ends
where one process folding the whole log does: same sessions, indexes, the same recently
destroyed sessions and remembered commands in the same order, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from contracts import (
    REGISTRY_ID,
    Accepted,
    ModuleRegistered,
    OrphanCleanupRequested,
    ReplayedEvent,
    SessionCreated,
    SessionStatus,
    StatusChanged,
    WorkflowConfig,
)
from coordinator.domain import compact
from coordinator.domain.clock import ManualClock
from coordinator.errors import ConfigurationError
from coordinator.read.projections import Projections
from coordinator.read.rebuild import _decoder, _encoder, _merge, _part, rebuild_partitioned
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore, Partition, Upcaster
from tests.coordinator.conftest import Backend
from tests.coordinator.test_restart import CHECKPOINT, _build_varied, _observed

S = SessionStatus
# Small memories, so that dropping the oldest commands and destroyed sessions happens
# many times over this history, in every partition.
COMMANDS = 40
DESTROYED = 5


async def _history(backend: Backend, clock: ManualClock) -> list[uuid.UUID]:
    """The restart suite's varied sessions, then enough short lifecycles that every
    partition destroys sessions and remembers many commands."""
    async with SessionCoordinator(backend.url, clock=clock) as live:
        ids = await _build_varied(live, clock)
        for i in range(24):
            sid = (await live.create_workflow_session(config=WorkflowConfig())).session_id
            ids.append(sid)
            await live.link_module_session(sid, "executor", uuid.uuid4())
            await live.link_module_session(sid, "ai-integration", uuid.uuid4())
            await live.record_activity(sid, "executor")
            if i % 2:
                await live.destroy_workflow_session(sid)
                await live.unlink_module_session(sid, "executor")
                await live.unlink_module_session(sid, "ai-integration")
    backend.delete_checkpoint(CHECKPOINT)
    return ids


def _sequential(store: EventStore, **memory: int) -> Projections:
    proj = Projections(**memory)
    proj.begin_replay()
    for page in store.replay(0, 50):
        proj.apply_all(page)
    proj.end_replay()
    return proj


def _everything(proj: Projections) -> dict[str, Any]:
    """All a projection holds, in the order it holds it where the order means something
    (which destroyed sessions and commands are dropped first), not in the session
    table, whose order no read depends on."""
    return {
        "position": proj.position,
        "events_applied": proj.events_applied,
        "sessions": {sid: proj.sessions[sid] for sid in proj.sessions},
        "by_status": {status: set(ids) for status, ids in proj.by_status.items()},
        "by_module": {m: set(ids) for m, ids in proj.by_module.items()},
        "destroyed": proj.destroyed,
        "recently_destroyed": [
            (sid, proj.recently_destroyed[sid]) for sid in proj.recently_destroyed
        ],
        "modules": proj.modules,
        "orphans": proj.orphans,
        "commands": list(proj.commands.items()),
    }


def _shared_ids(proj: Projections) -> bool:
    """Every index holds the session table's own id object."""
    table = {sid.int: sid for sid in proj.sessions}
    indexed = [sid for ids in proj.by_status.values() for sid in ids]
    indexed += [sid for ids in proj.by_module.values() for sid in ids]
    named = [a.session_id for a in proj.commands.values() if a.session_id is not None]
    return all(table[sid.int] is sid for sid in indexed) and all(
        table.get(sid.int, sid) is sid for sid in named
    )


@pytest.mark.parametrize("workers", [2, 3, 5])
async def test_partitioned_rebuild_equals_the_sequential_fold(
    backend: Backend, clock: ManualClock, workers: int
) -> None:
    await _history(backend, clock)
    with EventStore(backend.url) as store:
        total = store.max_position()
        expected = _sequential(store, command_memory=COMMANDS, destroyed_memory=DESTROYED)
        merged = rebuild_partitioned(
            store,
            total,
            workers=workers,
            page=50,
            command_memory=COMMANDS,
            destroyed_memory=DESTROYED,
        )
        # Every partition holds sessions.
        parts = [
            {
                e.session_id
                for page in store.replay(0, 500, part=Partition(i, workers))
                for e in page
            }
            for i in range(workers)
        ]
    assert merged is not None, "the partitioned rebuild fell back to one process"
    assert all(parts)
    assert len(expected.recently_destroyed) == DESTROYED
    assert COMMANDS <= len(expected.commands) < total
    assert _everything(merged) == _everything(expected)
    assert _shared_ids(merged)


def test_a_command_in_the_registry_and_a_session_is_merged_as_one() -> None:
    """A command can write to the registry and to one session (a repair asks for orphan
    cleanup and fails the session). With the two streams in different partitions, the
    merged memory has one entry for it where it was first seen, counting every event
    and naming the session, whichever stream came first; as a sequential fold has it."""
    registry_part = (REGISTRY_ID.int & 15) % 2
    sessions = [uuid.UUID(int=(n << 4) | (1 - registry_part)) for n in range(1, 4)]
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    first, second, plain = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    # Each entry: stream, event, command.
    log: list[tuple[uuid.UUID, Any, uuid.UUID]] = [
        (sid, SessionCreated(steps=["a"]), plain if sid == sessions[0] else uuid.uuid4())
        for sid in sessions
    ]
    changed = StatusChanged(old_status=S.INITIALIZING, new_status=S.FAILED, reason="repair")
    cleanup = OrphanCleanupRequested(
        module_id="executor", workflow_session_id=sessions[0], module_session_id=uuid.uuid4()
    )
    log += [
        (REGISTRY_ID, ModuleRegistered(module_id="executor", required=True), plain),
        (REGISTRY_ID, cleanup, first),  # the registry first, then the session
        (sessions[1], changed, first),
        (sessions[2], changed, second),  # the session first, then the registry
        (REGISTRY_ID, cleanup, second),
        (REGISTRY_ID, cleanup, second),
    ]
    versions: dict[uuid.UUID, int] = {}
    events = []
    for position, (stream, event, command) in enumerate(log, start=1):
        versions[stream] = versions.get(stream, 0) + 1
        events.append(
            ReplayedEvent(
                session_id=stream,
                version=versions[stream],
                occurred_at=t0,
                event=event,
                position=position,
                causation_id=command,
            )
        )
    expected = Projections()
    expected.apply_all(events)
    halves = []
    for index in (0, 1):
        half = Projections()
        half.track_positions()
        half.apply_all([e for e in events if Partition(index, 2).holds(e.session_id)])
        halves.append(half)
    own, other = halves
    sent = _decoder.decode(_encoder.encode(_part(other)))
    merged = _merge(own, [sent], len(events))

    assert list(merged.commands.items()) == list(expected.commands.items())
    outcomes = {c: expected.commands[c.int] for c in (first, second, plain)}
    assert outcomes[first] == Accepted(session_id=sessions[1], version=2, events=2)
    assert outcomes[second] == Accepted(session_id=sessions[2], version=2, events=3)
    assert outcomes[plain] == Accepted(session_id=sessions[0], version=1, events=2)
    assert merged.position == expected.position == len(events)
    assert merged.events_applied == len(events)


async def test_the_coordinator_rebuilds_in_processes_and_serves_the_same_reads(
    backend: Backend, clock: ManualClock
) -> None:
    ids = await _history(backend, clock)
    async with SessionCoordinator(backend.url, clock=clock, rebuild_workers=1) as one:
        assert one.rebuild_processes == 1
        seen = await _observed(one, ids)
        expected = _everything(one.projections)
    backend.delete_checkpoint(CHECKPOINT)
    progress: list[tuple[int, int]] = []
    async with SessionCoordinator(
        backend.url,
        clock=clock,
        rebuild_workers=3,
        parallel_rebuild_min=0,
        progress=lambda done, total: progress.append((done, total)),
    ) as three:
        assert three.rebuild_processes == 3
        assert _everything(three.projections) == expected
        assert await _observed(three, ids) == seen
        # Commands applied before the restart are still answered, not re-applied.
        assert three._writer is not None
        assert list(three._writer._applied) == [uuid.UUID(int=k) for k, _ in expected["commands"]]
    assert progress[-1] == (expected["position"], expected["position"])


async def test_below_the_threshold_one_process_folds(backend: Backend, clock: ManualClock) -> None:
    await _history(backend, clock)
    async with SessionCoordinator(backend.url, clock=clock, rebuild_workers=3) as coordinator:
        assert coordinator.rebuild_processes == 1


def test_rebuild_workers_out_of_range_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="rebuild_workers"):
        SessionCoordinator(None, rebuild_workers=0)
    with pytest.raises(ConfigurationError, match="rebuild_workers"):
        SessionCoordinator(None, rebuild_workers=17)


def _step(raw: dict[str, Any]) -> dict[str, Any]:
    return raw


async def test_what_a_worker_cannot_do_leaves_the_fold_to_one_process(
    tmp_path: Any, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An in-memory store or an upcaster that cannot be sent: ``None``, nothing started.
    A history a worker cannot read: ``None`` and a warning; the coordinator's start then
    fails with the sequential fold's own error, as it does with one process."""
    with EventStore("sqlite:///:memory:") as memory:
        assert rebuild_partitioned(memory, 10, workers=2) is None
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    backend = Backend("sqlite", url, sqlite_path=str(tmp_path / "s.sqlite"))
    ids = await _history(backend, clock)
    local = Upcaster({1: lambda raw: raw}, target=2)  # a lambda cannot be pickled
    with EventStore(url, upcaster=local) as store:
        assert rebuild_partitioned(store, store.max_position(), workers=2) is None

    # Corrupt an event of a session outside partition 0 of 2.
    victim = next(sid for sid in ids if Partition(1, 2).holds(sid))
    backend.tamper(victim, 1, lambda state: state.replace(b'"version":1', b'"version":"x"', 1))
    with EventStore(url) as store, caplog.at_level(logging.WARNING, "sessionbus"):
        assert rebuild_partitioned(store, store.max_position(), workers=2) is None
    assert "partitioned rebuild failed" in caplog.text
    errors = []
    for workers in (1, 2):
        coordinator = SessionCoordinator(url, clock=clock, rebuild_workers=workers)
        with pytest.raises(Exception) as raised:  # noqa: PT011 (compared below)
            async with coordinator:
                pass
        errors.append((type(raised.value), str(raised.value)))
    assert errors[0] == errors[1]


def test_partitions_split_the_log_by_session() -> None:
    """``Partition.holds`` is what the stores select: disjoint parts, whole streams."""
    ids = [uuid.uuid4() for _ in range(64)]
    for count in (1, 2, 3, 16):
        parts = [Partition(i, count) for i in range(count)]
        for sid in ids:
            assert sum(p.holds(sid) for p in parts) == 1
    with pytest.raises(ConfigurationError):
        Partition(0, 17)
    with pytest.raises(ConfigurationError):
        Partition(3, 3)


def test_states_packed_by_another_process_are_renumbered() -> None:
    """A worker numbers module names in the order it meets them; its packed states
    unpack the same here once renumbered."""
    from tests.coordinator.test_compact import _session  # noqa: PLC0415

    state = _session(required_modules=["task-loop", "executor"])
    blob = compact.pack(state)
    assert blob is not None
    ours = compact.names()
    assert {"executor", "task-loop"} <= set(ours)
    theirs = list(reversed(ours))  # another process's numbering of the same names
    foreign = compact.renumber(blob, [theirs.index(name) for name in ours])
    assert foreign != blob
    mapping = compact.renumbering(theirs)
    assert mapping is not None
    assert compact.renumber(foreign, mapping) == blob
    assert compact.unpack(state.session_id, compact.renumber(foreign, mapping)) == state
    assert compact.renumbering(compact.names()) is None


async def test_a_partition_read_is_the_full_read_filtered(
    backend: Backend, clock: ManualClock
) -> None:
    """``replay(part=…, until=…)`` gives what ``read`` gives, filtered by ``holds`` and
    bounded: the same events with the same positions."""
    await _history(backend, clock)
    with EventStore(backend.url) as store:
        until = store.max_position() - 7
        everything = [(e.position, e.session_id, e.version) for e in store.read(0, 100_000)]
        for count in (2, 3):
            for index in range(count):
                part = Partition(index, count)
                got = [
                    (e.position, e.session_id, e.version)
                    for page in store.replay(0, 17, until=until, part=part)
                    for e in page
                ]
                assert got == [
                    x for x in everything if x[0] is not None and x[0] <= until and part.holds(x[1])
                ]
