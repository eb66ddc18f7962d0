"""What is stored: the hash chain catches a single flipped byte in the database and
names the event; snapshots reload equal state; older schema versions are upcast on
read while the chain is still verified on the stored form."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from contracts import (
    GENESIS_HASH,
    REGISTRY_ID,
    ActivityRecorded,
    ReplayedEvent,
    SessionCreated,
    SessionStatus,
    compute_hash_raw,
    fold_history,
    verify_chain,
    verify_chain_raw,
)
from coordinator.domain.aggregates import OPERATOR, CommandContext, WorkflowSessionAggregate
from coordinator.domain.clock import ManualClock
from coordinator.errors import ConfigurationError
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EnvelopeMapper, EventStore, Upcaster
from tests.coordinator.conftest import Backend
from tests.coordinator.support import store_of

S = SessionStatus


async def _real_session(coordinator: SessionCoordinator) -> uuid.UUID:
    """A session with a varied history: created, linked, activated, active, paused,
    destroyed, unlinked (9 events)."""
    await coordinator.register_module("executor", required=True)
    sid = (await coordinator.create_workflow_session(["open page", "fill form"])).session_id
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())  # 2 events
    await coordinator.record_activity(sid, "executor")
    await coordinator.update_session_status(sid, S.PAUSED)
    await coordinator.update_session_status(sid, S.ACTIVE)
    await coordinator.destroy_workflow_session(sid)
    await coordinator.unlink_module_session(sid, "executor")  # Unlinked + Destroyed
    return sid


def _replace_once(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def mutate(state: bytes) -> bytes:
        assert state.count(old) >= 1, f"{old!r} not in {state!r}"
        return state.replace(old, new, 1)

    return mutate


def _flip_hash_digit(state: bytes) -> bytes:
    marker = b'"hash":"'
    at = state.index(marker) + len(marker)
    digit = b"1" if state[at : at + 1] != b"1" else b"2"
    return state[:at] + digit + state[at + 1 :]


def _break_first_byte(state: bytes) -> bytes:
    assert state[:1] == b"{"
    return b"X" + state[1:]


# (version to tamper with, how, whether the bytes remain valid JSON)
TAMPERING = {
    "actor-char": (4, _replace_once(b'"actor":"operator"', b'"actor":"operatos"'), True),
    "step-char": (1, _replace_once(b'"open page"', b'"open pagf"'), True),
    "status-char": (5, _replace_once(b'"PAUSED"', b'"PAUSEE"'), True),
    "hash-digit": (6, _flip_hash_digit, True),
    "undecodable": (2, _break_first_byte, False),
}


async def test_verify_history_accepts_a_real_session(coordinator: SessionCoordinator) -> None:
    """An untouched history verifies, event by event, including the registry stream."""
    sid = await _real_session(coordinator)
    verdict = await coordinator.verify_history(sid)
    assert verdict.ok
    assert verdict.events_checked == 9
    assert verdict.first_bad_version is None
    assert verdict.session_id == str(sid)
    assert (await coordinator.verify_history(REGISTRY_ID)).ok


async def test_sessions_destroyed_long_ago_are_counted_and_read_from_the_store(
    coordinator: SessionCoordinator,
) -> None:
    """The read models keep the final state of the newest destroyed sessions only and
    count the rest: an older one is read from its history, an id that never was a
    workflow session (or the registry's) reads as None."""
    coordinator.projections.destroyed_memory = 2
    ids = []
    for _ in range(4):
        sid = (await coordinator.create_workflow_session()).session_id
        await coordinator.destroy_workflow_session(sid, "done")
        ids.append(sid)
    proj = coordinator.projections
    assert proj.destroyed == 4
    assert list(proj.recently_destroyed) == ids[2:]
    for sid in ids:
        session = await coordinator.get_workflow_session(sid)
        assert session is not None
        assert session.destroyed
        assert session == fold_history((await coordinator.get_session_history(sid)).events)
    assert await coordinator.get_workflow_session(uuid.uuid4()) is None
    assert await coordinator.get_workflow_session(REGISTRY_ID) is None
    health = await coordinator.get_coordinator_health()
    assert health.total_workflow_sessions == 4
    old = await coordinator.validate_session_integrity(ids[0])
    recent = await coordinator.validate_session_integrity(ids[3])
    assert old.workflow_session_id == ids[0]
    assert msgspec.structs.replace(old, workflow_session_id=ids[3]) == recent


@pytest.mark.parametrize("how", sorted(TAMPERING))
async def test_one_flipped_byte_in_the_database_is_found_and_located(
    coordinator: SessionCoordinator, backend: Backend, how: str
) -> None:
    """Change ONE byte of one stored event directly in the database: the verifier
    reports exactly that event's version, whether or not the bytes still decode."""
    sid = await _real_session(coordinator)
    version, mutate, stays_json = TAMPERING[how]
    original = backend.stored_state(sid, version)
    backend.tamper(sid, version, mutate)
    tampered = backend.stored_state(sid, version)
    assert len(tampered) == len(original)
    assert sum(a != b for a, b in zip(original, tampered, strict=True)) == 1
    if stays_json:
        json.loads(tampered)
    else:
        with pytest.raises(ValueError, match="Expecting value"):
            json.loads(tampered)

    verdict = await coordinator.verify_history(sid)
    assert not verdict.ok
    assert verdict.first_bad_version == version
    assert verdict.events_checked == version
    assert verdict.reason is not None
    if not stays_json:
        assert "cannot be decoded" in verdict.reason

    backend.tamper(sid, version, lambda _: original)
    assert (await coordinator.verify_history(sid)).ok


async def test_sessions_with_many_events_are_snapshotted_and_reload_equal(
    backend: Backend, clock: ManualClock
) -> None:
    """With a snapshot interval of 5, a session of 13 events gets snapshot rows, and
    loading it (snapshot + later events) gives exactly the live state, in this process
    and in a fresh store object."""
    store = EventStore(backend.url, snapshot_interval=5)
    try:
        async with SessionCoordinator(store, clock=clock) as coordinator:
            await coordinator.register_module("task-loop", required=False)
            sid = (await coordinator.create_workflow_session(["a"])).session_id  # v1-2
            await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())  # v3
            for i in range(10):  # v4-13
                clock.advance(seconds=1)
                await coordinator.record_activity(sid, "task-loop" if i % 2 else None)
            live = await coordinator.get_workflow_session(sid)
            assert live is not None
            assert live.version == 13
            loaded = await _load(store, sid)
            assert loaded.state == live
            assert loaded.version == 13
            events = store.history(sid)
            assert loaded.last_hash == events[-1].hash
            assert fold_history(events) == live
        assert backend.snapshot_versions(sid) == [5, 10]
    finally:
        store.close()

    fresh = EventStore(backend.url, snapshot_interval=5)
    try:
        reloaded = await _load(fresh, sid)
        assert reloaded.state == live
        # The reload starts at the snapshot: events before it are not read at all.
        backend.tamper(sid, 3, _break_first_byte)
        from_snapshot = await _load(fresh, sid)
        assert from_snapshot.state == live
        assert from_snapshot.last_hash == reloaded.last_hash
    finally:
        fresh.close()


async def _load(store: EventStore, sid: uuid.UUID) -> WorkflowSessionAggregate:
    aggregate = await asyncio.to_thread(store.load, sid)
    assert isinstance(aggregate, WorkflowSessionAggregate)
    return aggregate


async def test_a_snapshotted_module_registry_reloads_after_a_restart(
    backend: Backend, clock: ManualClock
) -> None:
    """The module registry stream (which starts without a Created event) reloads from
    its snapshot plus later events after a restart, with every registration intact."""
    store = EventStore(backend.url, snapshot_interval=5)
    try:
        async with SessionCoordinator(store, clock=clock) as coordinator:
            for i in range(7):
                await coordinator.register_module("executor", required=i % 2 == 0)
            await coordinator.register_module("task-loop", required=False)
            before = coordinator.list_modules()
        assert backend.snapshot_versions(REGISTRY_ID) == [5]
    finally:
        store.close()
    async with SessionCoordinator(backend.url, clock=clock) as restarted:
        assert restarted.list_modules() == before
        registry = store_of(restarted).load_registry()
        assert registry.version == 8
        assert registry.required_modules() == ["executor"]
        # The writer's reloaded registry accepts new registrations after the restart.
        assert (await restarted.register_module("ai-integration")).events == 1
        created = await restarted.create_workflow_session()
        assert created.required_modules == ["ai-integration", "executor"]


# A snapshot row of the registry (version 2: "executor" required with capability "run",
# "task-loop" optional) as stores hold them, written by eventsourcing's own ``Snapshot``
# class through the store's mapper before the store had a snapshot type of its own.
_EARLIER_REGISTRY_SNAPSHOT = bytes.fromhex(
    "86a5746f706963d921636f6f7264696e61746f722e646f6d61696e3a4d6f64756c65526567697374"
    "7279a974696d657374616d70d6ff70dd5526aa637265617465645f6f6ed6ff00000000ab6d6f6469"
    "666965645f6f6ed6ff70dd5525a96c6173745f68617368d940333239646231663738396663656666"
    "38616561663239653934323037333836366165636635356435326631303634376136363737356133"
    "303737626536353766a8726567697374727982a76d6f64756c657382a86578656375746f7284a474"
    "797065b16d6f64756c652e72656769737465726564a96d6f64756c655f6964a86578656375746f72"
    "a87265717569726564c3ac6361706162696c697469657391a372756ea97461736b2d6c6f6f7083a4"
    "74797065b16d6f64756c652e72656769737465726564a96d6f64756c655f6964a97461736b2d6c6f"
    "6f70a87265717569726564c2a76f727068616e7380"
)
_EARLIER_REGISTRY_HASH = "329db1f789fceff8aeaf29e942073866aecf55d52f10647a66775a3077be657f"


async def test_a_registry_snapshot_row_as_earlier_stores_hold_it_loads(
    backend: Backend, clock: ManualClock
) -> None:
    """A snapshot row in the form stores already hold (topic, msgpack layout) loads
    as the registry it was taken of, and the chain goes on from its last hash: the
    store's own snapshot type reads and writes rows exactly as before."""
    store = EventStore(backend.url, snapshot_interval=3)
    try:
        backend.sql(
            f"INSERT INTO {backend.snapshots_table} "
            "(originator_id, originator_version, topic, state) VALUES (?, ?, ?, ?)",
            (
                backend._stream_key(REGISTRY_ID),
                2,
                "eventsourcing.domain:Snapshot",
                _EARLIER_REGISTRY_SNAPSHOT,
            ),
        )
        registry = store.load_registry()
        assert registry.version == 2
        assert registry.last_hash == _EARLIER_REGISTRY_HASH
        assert registry.required_modules() == ["executor"]
        assert registry.state.modules["executor"].capabilities == ["run"]
        assert registry.is_registered("task-loop")
        ctx = CommandContext(OPERATOR, clock.now())
        registry.register(ctx, "ai-integration", required=True, capabilities=[])
        (saved,) = await asyncio.to_thread(store.save, [registry])
        assert (saved.version, saved.prev_hash) == (3, _EARLIER_REGISTRY_HASH)
        snapshots = backend.sql(
            f"SELECT originator_version, topic FROM {backend.snapshots_table} "
            "ORDER BY originator_version"
        )
        assert [tuple(row) for row in snapshots] == [
            (2, "eventsourcing.domain:Snapshot"),
            (3, "eventsourcing.domain:Snapshot"),
        ]
    finally:
        store.close()
    fresh = EventStore(backend.url)
    try:
        reloaded = fresh.load_registry()
        assert reloaded.version == 3
        assert reloaded.required_modules() == ["ai-integration", "executor"]
    finally:
        fresh.close()


async def test_events_stored_before_the_domain_became_a_package_load(
    backend: Backend, clock: ManualClock
) -> None:
    """Stored events name their class with its module path, and events stored before
    the aggregates moved name ``coordinator.domain``: a store holding only such events
    (no snapshots) loads its sessions and its registry as before, and takes commands on
    them after a restart."""
    async with SessionCoordinator(backend.url, clock=clock) as coordinator:
        await coordinator.register_module("executor", required=True)
        sid = (await coordinator.create_workflow_session(["a"])).session_id
        await coordinator.link_module_session(sid, "executor", uuid.uuid4())
        live = await coordinator.get_workflow_session(sid)
    new_prefix = WorkflowSessionAggregate.__module__ + ":"
    assert new_prefix != "coordinator.domain:"
    backend.sql(
        f"UPDATE {backend.events_table} SET topic = replace(topic, ?, 'coordinator.domain:')",
        (new_prefix,),
    )
    topics = {row[0] for row in backend.sql(f"SELECT DISTINCT topic FROM {backend.events_table}")}
    assert topics == {
        "coordinator.domain:ModuleRegistry.Event",
        "coordinator.domain:WorkflowSessionAggregate.Created",
        "coordinator.domain:WorkflowSessionAggregate.Event",
    }
    backend.sql(f"DELETE FROM {backend.snapshots_table}")
    store = EventStore(backend.url)
    try:
        loaded = await _load(store, sid)
        assert loaded.state == live
        assert store.load_registry().required_modules() == ["executor"]
    finally:
        store.close()
    async with SessionCoordinator(backend.url, clock=clock) as restarted:
        assert (await restarted.record_activity(sid, "executor")).events == 1


# --- upcasting ----------------------------------------------------------------------


def _raw_envelope(
    sid: uuid.UUID, version: int, prev_hash: str, event: dict[str, Any]
) -> dict[str, Any]:
    """A version-1 envelope as an old writer stored it: no ``schema_version`` field."""
    raw: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "session_id": str(sid),
        "version": version,
        "occurred_at": f"2029-12-31T23:00:0{version}Z",
        "actor": "legacy-writer",
        "prev_hash": prev_hash,
        "event": event,
    }
    raw["hash"] = compute_hash_raw(raw)
    return raw


def _to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """A made-up v1 -> v2 migration: actors gained a namespace, and every created
    session gained a step."""
    out = dict(raw)
    out["actor"] = "v1:" + raw["actor"]
    if raw["event"]["type"] == "session.created":
        out["event"] = {**raw["event"], "steps": [*raw["event"].get("steps", []), "migrated"]}
    return out


async def test_old_schema_versions_are_upcast_on_read_and_verified_as_stored(
    backend: Backend,
) -> None:
    """Raw version-1 envelopes written into the store are read through an
    Upcaster(target=2): the decoded envelopes show the migration, the aggregate folds
    them, and the chain still verifies on the stored (raw) form."""
    sid = uuid.uuid4()
    # As the version-1 writer encoded it (a Struct-valued default is always written).
    created = {"type": "session.created", "steps": ["old"], "config": {}}
    first = _raw_envelope(sid, 1, GENESIS_HASH, created)
    second = _raw_envelope(sid, 2, first["hash"], {"type": "session.activity-recorded"})
    assert "schema_version" not in first
    writer = EventStore(backend.url)
    try:
        writer.recorder.insert_events(
            [
                StoredEvent(
                    originator_id=sid,
                    originator_version=raw["version"],
                    topic=get_topic(
                        WorkflowSessionAggregate.Created
                        if raw["version"] == 1
                        else WorkflowSessionAggregate.Event
                    ),
                    state=msgspec.json.encode(raw),
                )
                for raw in (first, second)
            ]
        )
        # Read with today's schema (version 1), nothing changes.
        plain = writer.history(sid)
        assert [e.actor for e in plain] == ["legacy-writer", "legacy-writer"]
        assert verify_chain(plain).ok
    finally:
        writer.close()

    reader = EventStore(backend.url, upcaster=Upcaster(target=2, steps={1: _to_v2}))
    try:
        upcast = reader.history(sid)
        assert [e.schema_version for e in upcast] == [2, 2]
        assert [e.actor for e in upcast] == ["v1:legacy-writer", "v1:legacy-writer"]
        assert upcast[0].event == SessionCreated(steps=["old", "migrated"])
        assert upcast[1].event == ActivityRecorded()
        assert [e.hash for e in upcast] == [first["hash"], second["hash"]]
        raw_history = reader.raw_history(sid)
        assert raw_history == [first, second], "raw history is exactly what was stored"
        assert verify_chain_raw(raw_history).ok
        # The hash covers the stored form; the upcast form no longer matches it.
        assert not verify_chain(upcast).ok
        # A replay (what a rebuild folds) takes the upcasting path for old versions.
        replayed = [e for page in reader.replay() for e in page]
        assert [e.event for e in replayed] == [e.event for e in upcast]
        assert [e.schema_version for e in replayed] == [2, 2]
        aggregate = reader.load(sid)
        assert isinstance(aggregate, WorkflowSessionAggregate)
        assert aggregate.state.steps == ["old", "migrated"]
        assert aggregate.state.status is S.INITIALIZING
        assert aggregate.state.version == 2
        assert aggregate.version == 2
    finally:
        reader.close()


async def test_a_replay_reads_every_field_a_fold_needs_as_the_full_envelope_has_it(
    coordinator: SessionCoordinator,
) -> None:
    """Rebuilds decode only what folding reads (``ReplayedEvent``): the same session,
    version, time, event, position and cause as the full envelopes, in the same order."""
    await coordinator.register_module("executor", required=False)
    for _ in range(3):
        sid = (await coordinator.create_workflow_session(["a"])).session_id
        await coordinator.link_module_session(sid, "executor", uuid.uuid4())
        await coordinator.record_activity(sid, "executor")
        await coordinator.destroy_workflow_session(sid)
    store = store_of(coordinator)
    full = [e for page in store.iter_all() for e in page]
    light = [e for page in store.replay() for e in page]
    assert len(light) == len(full) > 10
    fields = ("session_id", "version", "occurred_at", "event", "position", "causation_id")
    for replayed, env in zip(light, full, strict=True):
        assert isinstance(replayed, ReplayedEvent)
        assert {f: getattr(replayed, f) for f in fields} == {f: getattr(env, f) for f in fields}
        assert replayed.type == env.type


def test_an_upcaster_with_a_missing_step_is_refused() -> None:
    """Every version below the target needs a step: a gap is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match=r"\[2\]"):
        Upcaster(target=3, steps={1: _to_v2})
    with pytest.raises(ConfigurationError, match=r"\[1\]"):
        Upcaster(target=2)
    Upcaster(target=3, steps={1: _to_v2, 2: dict})


def test_an_envelope_newer_than_the_reader_is_refused() -> None:
    """A stored envelope of a schema version the reader does not know is not guessed
    at: decoding raises ConfigurationError naming the upgrade."""
    sid = uuid.uuid4()
    raw = _raw_envelope(sid, 1, GENESIS_HASH, {"type": "session.created", "config": {}})
    raw["schema_version"] = 2
    mapper = EnvelopeMapper()
    with pytest.raises(ConfigurationError, match="upgrade the coordinator"):
        mapper.decode_envelope(msgspec.json.encode(raw))
    upgraded = EnvelopeMapper(upcaster=Upcaster(target=2, steps={1: _to_v2}))
    assert upgraded.decode_envelope(msgspec.json.encode(raw)).actor == "legacy-writer"
