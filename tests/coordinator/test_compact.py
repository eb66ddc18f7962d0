"""The compact in-memory form of sessions: exact round trips (equal, and the same
bytes on the wire), states it refuses to hold, and the projections and aggregates
that keep their sessions packed reading the same as unpacked ones."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from contracts import (
    ErrorCode,
    ModuleSessionConfig,
    ModuleSessionInfo,
    SessionStatus,
    StandardError,
    WorkflowConfig,
    WorkflowSession,
    fold_history,
)
from coordinator.domain.clock import ManualClock
from coordinator.domain.compact import created_key, deadline_of, micros, pack, unpack
from coordinator.read.projections import Projections, SessionTable
from coordinator.service.coordinator import SessionCoordinator

S = SessionStatus
T0 = datetime(2030, 1, 1, tzinfo=UTC)
_json = msgspec.json.Encoder()


def _module(sid: uuid.UUID, module_id: str, **changes: Any) -> ModuleSessionInfo:
    info = ModuleSessionInfo(
        module_id=module_id,
        session_id=uuid.uuid4(),
        linked_workflow_session_id=sid,
        status=S.ACTIVE,
        created_at=T0,
        last_activity=T0 + timedelta(seconds=3),
        metadata={"worker": f"{module_id}-1", "n": [1, 2.5, None, True, {"k": "v"}]},
        config=ModuleSessionConfig(timeout_ms=60_000, retry_attempts=3),
    )
    return msgspec.structs.replace(info, **changes)


def _session(**changes: Any) -> WorkflowSession:
    sid = uuid.uuid4()
    executor = _module(sid, "executor")
    loop = _module(sid, "task-loop", last_activity=T0, status=S.PAUSED, metadata={})
    config = WorkflowConfig(
        timeout_ms=120_000,
        required_modules=["executor"],
        module_configs={"task-loop": ModuleSessionConfig(metadata={"a": 1})},
        metadata={"tenant": "t1"},
    )
    state = WorkflowSession(
        session_id=sid,
        status=S.ACTIVE,
        created_at=T0,
        last_activity=T0 + timedelta(seconds=9),
        executor_session_id=executor.session_id,
        steps=["a", "b"],
        required_modules=["executor"],
        modules={"executor": executor, "task-loop": loop},
        metadata={"tenant": "t1"},
        config=config,
        status_changed_at=T0 + timedelta(seconds=1),
        version=7,
    )
    return msgspec.structs.replace(state, **changes)


def _round_trip(state: WorkflowSession) -> WorkflowSession:
    packed = pack(state)
    assert packed is not None
    back = unpack(state.session_id, packed)
    assert back == state
    assert _json.encode(back) == _json.encode(state)
    return back


def test_round_trips_are_exact() -> None:
    state = _session()
    back = _round_trip(state)
    assert back.modules is not state.modules  # a new object every time
    assert list(back.modules) == list(state.modules)  # in the same order
    failed = _session(
        status=S.FAILED,
        failure=StandardError(
            code=ErrorCode.MODULE_ERROR, message="boom", module_id="executor", details={"x": 1}
        ),
    )
    _round_trip(failed)
    destroyed = _session(modules={}, destroyed=True, executor_session_id=None)
    _round_trip(destroyed)
    # The defaults: omitted from the wire because they are the default objects.
    plain = _session(config=WorkflowConfig(), metadata={}, status_changed_at=None, steps=[])
    assert b"link_timeout_ms" not in _json.encode(_round_trip(plain))
    # An explicit value equal to the default is not the default object: kept on the wire.
    explicit = _session(config=WorkflowConfig(link_timeout_ms=int("30000")), metadata={})
    assert b"link_timeout_ms" in _json.encode(_round_trip(explicit))


@pytest.mark.parametrize(
    "changes",
    [
        {"created_at": datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))},
        {"last_activity": datetime(2030, 1, 1)},  # noqa: DTZ001 - naive on purpose
        {"metadata": {"when": (1, 2)}},
        {"metadata": {"big": 2**70}},
        {"metadata": {1: "not a string key"}},
        {"steps": ["a", 2]},
        {"executor_session_id": None},  # disagrees with the linked executor module
    ],
)
def test_states_it_cannot_hold_exactly_are_refused(changes: dict[str, Any]) -> None:
    assert pack(_session(**changes)) is None


def test_header_orders_and_deadline() -> None:
    early, late = _session(), _session(created_at=T0 + timedelta(microseconds=1))
    deadline = T0 + timedelta(minutes=5)
    early_packed, late_packed = pack(early, deadline), pack(late)
    assert early_packed is not None
    assert late_packed is not None
    assert created_key(early_packed) == micros(T0) < created_key(late_packed)
    assert deadline_of(early_packed) == deadline
    assert deadline_of(late_packed) is None


def test_session_table_reads_the_same_packed_or_not() -> None:
    states = [_session(created_at=T0 + timedelta(seconds=i)) for i in range(10)]
    states.append(_session(metadata={"when": (1, 2)}))  # not packable: stays an object
    table = SessionTable(hot=2)
    for state in states:
        table.put(state)
    table.compact()
    assert len(table) == len(states)
    assert list(table) == [s.session_id for s in states]
    assert dict(table.items()) == {s.session_id: s for s in states}
    for state in states:
        assert state.session_id in table
        assert table.get(state.session_id) == state
        assert table.created(state.session_id) == micros(state.created_at)
    assert uuid.uuid4() not in table
    assert table.get(uuid.uuid4()) is None


async def test_a_coordinator_with_everything_packed_reads_as_one_without(
    tmp_path: Any, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read, with no session left unpacked in the projections or the writer's
    cache, against the same reads of a coordinator whose projections are restored
    from its own snapshot (as objects); then a restart from the checkpoint."""
    monkeypatch.setattr("coordinator.read.projections.HOT_SESSIONS", 0)
    monkeypatch.setattr("coordinator.read.projections.DESTROYED_HOT", 0)
    monkeypatch.setattr("coordinator.domain.aggregates.UnpackedStates.__init__.__defaults__", (0,))
    url = f"sqlite:///{tmp_path / 'packed.sqlite'}"
    async with SessionCoordinator(url, clock=clock) as coordinator:
        await coordinator.register_module("executor", required=True)
        await coordinator.register_module("task-loop", required=False)
        ids = []
        for i in range(6):
            clock.advance(milliseconds=5)
            config = WorkflowConfig(timeout_ms=60_000, metadata={"i": i})
            sid = (await coordinator.create_workflow_session(["s"], config)).session_id
            ids.append(sid)
            if i % 3:
                await coordinator.link_module_session(sid, "executor", uuid.uuid4())
            if i % 2:
                await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
                await coordinator.record_activity(sid, "task-loop")
        await coordinator.destroy_workflow_session(ids[1])
        await coordinator.unlink_module_session(ids[1], "executor")
        await coordinator.unlink_module_session(ids[1], "task-loop")
        proj = coordinator.projections
        proj.sessions.compact()
        assert all(isinstance(v, tuple) for v in proj.sessions._data.values())
        reference = Projections.restore(proj.snapshot())
        # The checkpoint holds the packed states as they are and gives back the same.
        restored = Projections.decode_snapshot(proj.encode_snapshot())
        assert msgspec.msgpack.encode(restored.snapshot()) == msgspec.msgpack.encode(
            proj.snapshot()
        )
        # A snapshot leaves out the destroyed sessions' final states: from history.
        gone = fold_history((await coordinator.get_session_history(ids[1])).events)
        assert gone is not None
        assert gone.destroyed
        assert proj.get(ids[1]) == gone
        for sid in ids:
            if sid != ids[1]:
                assert proj.get(sid) == reference.get(sid)
                assert proj.integrity(sid) == reference.integrity(sid)
            assert proj.linked_sessions(sid) == reference.linked_sessions(sid)
        for status in (None, *S):
            for module_id in (None, "executor", "task-loop"):
                assert proj.active_session_ids(status, module_id) == (
                    reference.active_session_ids(status, module_id)
                )
                if status is None or status in (S.ACTIVE, S.INITIALIZING):
                    assert proj.sessions_page(status, module_id, 1, 3) == (
                        reference.sessions_page(status, module_id, 1, 3)
                    )
        assert sorted(proj.deadlines()) == sorted(reference.deadlines())
        seen = {sid: await coordinator.get_workflow_session(sid) for sid in ids}
    async with SessionCoordinator(url, clock=clock) as restarted:
        assert restarted.rebuilt_events == 0
        assert {sid: await restarted.get_workflow_session(sid) for sid in ids} == seen
