"""Following another coordinator's commits on PostgreSQL by the store's notifications
(LISTEN on the channel eventsourcing's recorder NOTIFYs in every insert), not by the
poll: each replica here polls once an hour, so only a notification can explain what it
sees."""

from __future__ import annotations

import uuid

import pytest

from contracts import CreateWorkflowSession, new_id
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore
from coordinator.store.watch import LogWatch
from module_sdk.testing import wait_for
from tests.support import services

pytestmark = pytest.mark.postgres

NEVER = 3600.0  # a poll interval no test waits out


async def _create(coordinator: SessionCoordinator) -> uuid.UUID:
    sid = new_id()
    await coordinator.handle(CreateWorkflowSession(session_id=sid, steps=["s"]))
    return sid


async def test_a_replica_sees_another_coordinators_commit_by_notification(
    pg_store_url: str,
) -> None:
    async with (
        SessionCoordinator(pg_store_url, follow_interval=NEVER, tune_gc=False) as writer,
        SessionCoordinator(pg_store_url, follow_interval=NEVER, tune_gc=False) as replica,
    ):
        await wait_for(lambda: replica.log_watch is not None, what="the replica to follow")
        for _ in range(3):
            sid = await _create(writer)
            await wait_for(
                lambda: sid in replica.projections.sessions,  # noqa: B023 - awaited here
                timeout=30,
                what="the replica to apply the other coordinator's session",
            )
        watch = replica.log_watch
        assert watch is not None
        assert watch.listens
        assert watch.wakeups >= 3


async def test_the_listening_connection_comes_back_after_its_backend_is_terminated(
    pg_store_url: str, postgres_url: str
) -> None:
    """A terminated backend ends the wait with an error; the watch connects again and
    reports a wake-up, so a commit made while nobody listened is seen too."""
    async with (
        SessionCoordinator(pg_store_url, follow_interval=NEVER, tune_gc=False) as writer,
        SessionCoordinator(pg_store_url, follow_interval=NEVER, tune_gc=False) as replica,
    ):
        await wait_for(
            lambda: replica.log_watch is not None and replica.log_watch.backend_pid is not None,
            timeout=30,
            what="the replica's listening connection",
        )
        watch = replica.log_watch
        assert watch is not None
        pid = watch.backend_pid
        services.pg_execute(postgres_url, f"SELECT pg_terminate_backend({pid})")
        sid = await _create(writer)
        await wait_for(
            lambda: sid in replica.projections.sessions,
            timeout=30,
            what="the replica to apply a session committed around the lost connection",
        )
        await wait_for(
            lambda: watch.backend_pid not in (None, pid), timeout=30, what="a new connection"
        )


async def test_stores_no_other_process_writes_to_are_not_listened_to() -> None:
    """SQLite and memory stores have one coordinator: the watch only sleeps."""
    with EventStore("memory://") as store:
        async with LogWatch(store) as watch:
            assert not watch.listens
            assert await watch.wait(0.0) is False
