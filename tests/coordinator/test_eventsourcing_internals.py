"""What ``coordinator.store.eventsourcing_internals`` relies on in eventsourcing (and
psycopg_pool), checked against the installed library on both stores: a release that
changes any of it fails here, not in the store.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from eventsourcing.application import Application
from eventsourcing.persistence import Recording

from contracts import WorkflowConfig
from coordinator.domain.aggregates import (
    COORDINATOR,
    CommandContext,
    ModuleRegistry,
    WorkflowSessionAggregate,
)
from coordinator.store.eventsourcing_internals import (
    notification_channel,
    record,
    select_states,
)
from coordinator.store.eventstore import EventStore, Partition
from tests.coordinator.conftest import Backend

_ALL = 2**63 - 1


def _new_sessions(count: int) -> list[WorkflowSessionAggregate]:
    """Unsaved sessions with two events each (created, then active)."""
    ctx = CommandContext(COORDINATOR, datetime.now(UTC))
    registry = ModuleRegistry.empty()
    return [
        WorkflowSessionAggregate.create(ctx, uuid.uuid4(), ["a"], WorkflowConfig(), registry)
        for _ in range(count)
    ]


def test_record_is_what_application_save_hands_to_the_event_store(backend: Backend) -> None:
    """``Application.save`` of the store's application makes exactly one call: the
    event store's ``put`` with every pending event of the aggregates, in order, and no
    tracking record, its recordings returned; it takes no snapshot and caches no
    aggregate. ``record`` makes the same call, and the events it records read back
    as saved."""
    store = EventStore(backend.url)
    try:
        app: Application[uuid.UUID] = store._app
        put = app.events.put
        calls: list[tuple[list[Any], dict[str, Any]]] = []

        def spy(events: list[Any], **kwargs: Any) -> list[Recording[uuid.UUID]]:
            calls.append((list(events), kwargs))
            return put(events, **kwargs)

        app.events.put = spy  # type: ignore[method-assign]
        by_save = _new_sessions(3)
        expected = [env for session in by_save for env in session.pending_envelopes()]
        recordings = app.save(*by_save)
        assert len(calls) == 1
        events, kwargs = calls[0]
        assert kwargs == {"tracking": None}
        assert [e.envelope for e in events] == expected
        assert [r.domain_event for r in recordings] == events
        assert all(s.unsaved == 0 for s in by_save)
        assert app.repository.cache is None
        assert app.snapshots is not None
        assert all(list(app.snapshots.get(s.id)) == [] for s in by_save)

        calls.clear()
        by_record = _new_sessions(2)
        expected = [env for session in by_record for env in session.pending_envelopes()]
        recorded = record(app, by_record)
        assert len(calls) == 1
        assert [e.envelope for e in calls[0][0]] == expected
        assert calls[0][1] == {}
        assert [r.notification.id for r in recorded] == [
            recordings[-1].notification.id + 1 + i for i in range(len(expected))
        ]
        assert [e for s in by_record for e in store.history(s.id)] == expected
    finally:
        store.close()


def test_states_selected_from_the_table_are_the_public_notifications(backend: Backend) -> None:
    """``select_states`` gives what the recorder's public ``select_notifications``
    gives, (position, state) for (id, state), with the same bounds; each partition
    holds exactly the streams ``Partition.holds`` puts in it (the stored id's text
    form ends in its low four bits), and the partitions together hold everything."""
    store = EventStore(backend.url)
    try:
        store.save(_new_sessions(40))
        recorder = store.recorder
        notifications = recorder.select_notifications(0, 1_000, inclusive_of_start=False)
        public = [(n.id, n.state) for n in notifications]
        assert len(public) == 80

        def states(*args: Any) -> list[tuple[int, bytes]]:
            selected = select_states(recorder, *args)
            assert selected is not None
            return [(int(position), bytes(state)) for position, state in selected]

        assert states(0, None, _ALL) == public
        after, until = public[9][0], public[49][0]
        assert states(after, 15, _ALL) == public[10:25]
        assert states(after, None, until) == public[10:50]

        stream_of = {n.id: uuid.UUID(str(n.originator_id)) for n in notifications}
        for count in (1, 3, 16):
            seen: list[tuple[int, bytes]] = []
            for index in range(count):
                part = states(0, None, _ALL, (index, count))
                assert all(Partition(index, count).holds(stream_of[p]) for p, _ in part)
                seen += part
            assert sorted(seen) == public
    finally:
        store.close()


def test_the_in_memory_store_is_left_to_the_public_selection() -> None:
    """A recorder ``select_states`` does not know (the in-memory one) gets ``None``,
    so the store reads it through ``select_notifications``."""
    store = EventStore("memory://")
    try:
        store.save(_new_sessions(2))
        assert select_states(store.recorder, 0, None, _ALL) is None
        assert [e.version for e in store.read(0)] == [1, 2, 1, 2]
    finally:
        store.close()


def test_a_save_notifies_the_recorders_channel(backend: Backend) -> None:
    """On PostgreSQL the recorder names a channel and every transaction that inserts
    events sends a notification on it when it commits (what ``LogWatch`` listens
    for); the other stores name none."""
    store = EventStore(backend.url)
    try:
        channel = notification_channel(store.recorder)
        if backend.name != "postgres":
            assert channel is None
            return
        assert channel
        assert backend.pg_dsn is not None
        with psycopg.connect(backend.pg_dsn, autocommit=True) as listener:
            listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
            store.save(_new_sessions(2))
            heard = list(listener.notifies(timeout=30, stop_after=1))
        assert [n.channel for n in heard] == [channel]
    finally:
        store.close()


@pytest.mark.postgres
def test_the_library_pool_connects_with_the_store_timeouts(pg_store_url: str) -> None:
    """The PostgreSQL datastore eventsourcing builds keeps a psycopg_pool pool, not
    open until first used, whose ``kwargs`` every new connection is made with: a
    connection the library hands out carries the URL's statement timeout and the
    store's keepalive settings, and the pool's reconnect timeout is the store's."""
    store = EventStore(f"{pg_store_url}&statement_timeout=7&connect_timeout=3")
    try:
        assert store.max_position() == 0
        timeouts = store.settings.postgres_timeouts
        assert timeouts is not None
        datastore: Any = store.recorder.datastore  # type: ignore[attr-defined]
        assert datastore.pool.reconnect_timeout == timeouts.reconnect
        with datastore.get_connection() as conn:
            (statement_timeout,) = conn.execute("SHOW statement_timeout").fetchone().values()
            parameters = conn.info.get_parameters()
        assert statement_timeout == "7s"
        assert parameters["connect_timeout"] == "3"
        assert parameters["keepalives_idle"] == str(timeouts.keepalives_idle)
        assert parameters["tcp_user_timeout"] == str(int(timeouts.user_timeout * 1000))
    finally:
        store.close()
