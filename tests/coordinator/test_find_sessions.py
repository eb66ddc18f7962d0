"""Finding a workflow session by any id (``FindWorkflowSessions``), destroyed ones too: a
destroyed session's state holds no links, so a module session's id leads to it through
the links not yet stored (memory) or the module-session lookup in the store, which is
written in batches, survives a restart, and is rebuilt from the log when missing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from contracts import (
    FindWorkflowSessions,
    ListWorkflowSessions,
    SessionsPage,
    WorkflowSession,
)
from coordinator.domain.clock import ManualClock
from coordinator.errors import StoreUnavailable
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import LINKS_CHECKPOINT
from tests.coordinator.conftest import Backend


async def _eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _destroyed_session(
    coordinator: SessionCoordinator, clock: ManualClock
) -> tuple[uuid.UUID, uuid.UUID]:
    """A workflow session that linked an executor session and was then destroyed:
    (workflow session id, module session id)."""
    if coordinator.get_module("executor") is None:
        await coordinator.register_module("executor", required=True)
    clock.advance(milliseconds=5)
    sid = (await coordinator.create_workflow_session(["s1"])).session_id
    module_sid = uuid.uuid4()
    await coordinator.link_module_session(sid, "executor", module_sid)
    await coordinator.destroy_workflow_session(sid)
    await coordinator.unlink_module_session(sid, "executor")
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.destroyed
    assert session.modules == {}  # nothing in the final state names the module session
    return sid, module_sid


async def _find(coordinator: SessionCoordinator, match_id: uuid.UUID) -> list[WorkflowSession]:
    result = await coordinator.handle(FindWorkflowSessions(match_id=match_id))
    assert isinstance(result, SessionsPage)
    assert result.next_after is None
    return result.sessions


async def test_a_destroyed_session_still_held_is_found_by_a_module_session_id(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    sid, module_sid = await _destroyed_session(coordinator, clock)
    assert sid in coordinator.projections.recently_destroyed
    # Not stored yet (no batch, no checkpoint): found through the pairs in memory.
    assert coordinator.store is not None
    assert coordinator.store.workflow_sessions_of(module_sid) == []

    (found,) = await _find(coordinator, module_sid)
    assert found.session_id == sid
    assert found.destroyed
    assert [s.session_id for s in await _find(coordinator, sid)] == [sid]
    # The live listing does not list it.
    live = await coordinator.handle(ListWorkflowSessions(match_id=module_sid))
    assert isinstance(live, SessionsPage)
    assert live.sessions == []
    assert await _find(coordinator, uuid.uuid4()) == []


async def test_a_live_session_is_found_by_a_module_session_it_unlinked(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    await coordinator.register_module("executor", required=True)
    await coordinator.register_module("task-loop", required=False)
    sid = (await coordinator.create_workflow_session(["s1"])).session_id
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    loop_sid = uuid.uuid4()
    await coordinator.link_module_session(sid, "task-loop", loop_sid)
    await coordinator.unlink_module_session(sid, "task-loop")
    (found,) = await _find(coordinator, loop_sid)
    assert found.session_id == sid
    assert not found.destroyed


async def test_a_destroyed_session_no_longer_held_is_found_through_the_store(
    coordinator: SessionCoordinator, clock: ManualClock, backend: Backend
) -> None:
    coordinator.projections.destroyed_memory = 1
    old_sid, old_module_sid = await _destroyed_session(coordinator, clock)
    new_sid, _ = await _destroyed_session(coordinator, clock)
    proj = coordinator.projections
    assert old_sid not in proj.recently_destroyed
    assert new_sid in proj.recently_destroyed
    # A checkpoint stores the pairs first (and the lookup's position with them).
    await asyncio.to_thread(coordinator.save_checkpoint)
    assert proj.new_links == []
    stored = backend.checkpoint(LINKS_CHECKPOINT)
    assert stored is not None
    assert stored[0] == proj.position

    (found,) = await _find(coordinator, old_module_sid)
    assert found.session_id == old_sid
    assert found.destroyed
    assert found.version > 1


async def test_pairs_are_stored_in_batches_after_commits(
    store_url: str, clock: ManualClock
) -> None:
    async with SessionCoordinator(store_url, clock=clock) as coordinator:
        links = coordinator._links
        assert links is not None
        links.batch = 3
        assert coordinator.store is not None
        store = coordinator.store
        first = [await _destroyed_session(coordinator, clock) for _ in range(2)]
        assert store.workflow_sessions_of(first[0][1]) == []  # fewer than a batch
        third = await _destroyed_session(coordinator, clock)
        await _eventually(
            lambda: store.workflow_sessions_of(third[1]) == [third[0]], "the batch stored"
        )
        for sid, module_sid in first:
            assert store.workflow_sessions_of(module_sid) == [sid]
        assert store.module_links_position() > 0


async def test_found_after_a_restart(store_url: str, clock: ManualClock) -> None:
    async with SessionCoordinator(store_url, clock=clock) as coordinator:
        made = [await _destroyed_session(coordinator, clock) for _ in range(3)]
    async with SessionCoordinator(store_url, clock=clock) as restarted:
        assert len(restarted.projections.recently_destroyed) == 0  # from the checkpoint
        assert restarted._links is not None
        assert restarted._links.complete
        for sid, module_sid in made:
            (found,) = await _find(restarted, module_sid)
            assert found.session_id == sid
            assert found.destroyed


async def test_a_missing_lookup_is_rebuilt_from_the_log(
    store_url: str, clock: ManualClock, backend: Backend
) -> None:
    """A store written before the lookup existed (no rows, no position), or one whose
    coordinator stopped before storing its last pairs: the next start reads the gap
    from the log in the background."""
    async with SessionCoordinator(store_url, clock=clock) as coordinator:
        made = [await _destroyed_session(coordinator, clock) for _ in range(4)]
    table = "sessionbus_module_sessions"
    if backend.name == "postgres":
        table = f'"{backend.pg_schema}".{table}'
    backend.sql(f"DELETE FROM {table}")
    backend.delete_checkpoint(LINKS_CHECKPOINT)
    async with SessionCoordinator(store_url, clock=clock) as restarted:
        links = restarted._links
        assert links is not None
        await _eventually(lambda: links.complete, "the lookup read from the log")
        for sid, module_sid in made:
            (found,) = await _find(restarted, module_sid)
            assert found.session_id == sid
        assert backend.checkpoint(LINKS_CHECKPOINT) == (restarted.projections.position, b"")
    # Stored complete on close: the next start reads nothing again.
    async with SessionCoordinator(store_url, clock=clock) as again:
        assert again._links is not None
        assert again._links.complete


async def test_a_batch_the_store_refuses_is_kept_searched_in_memory_and_stored_later(
    store_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database goes away under a lookup write (``StoreUnavailable``): the batch
    goes back to the pending pairs, a search still finds its sessions, and once the
    store is back the next write stores them all, its position with them."""
    async with SessionCoordinator(store_url, clock=clock) as coordinator:
        links = coordinator._links
        assert links is not None
        links.batch = 2
        assert coordinator.store is not None
        store = coordinator.store
        real = store.add_module_links
        refused: list[int] = []

        def away(*args: Any, **kwargs: Any) -> None:
            refused.append(len(args[0]))
            raise StoreUnavailable("add_module_links: the database is away")

        monkeypatch.setattr(store, "add_module_links", away)
        first = [await _destroyed_session(coordinator, clock) for _ in range(2)]
        await _eventually(lambda: bool(refused), "a refused write")
        for sid, module_sid in first:
            assert store.workflow_sessions_of(module_sid) == []
            assert [s.session_id for s in await _find(coordinator, module_sid)] == [sid]
        monkeypatch.setattr(store, "add_module_links", real)
        more = [await _destroyed_session(coordinator, clock) for _ in range(2)]
        for sid, module_sid in first + more:
            await _eventually(
                lambda m=module_sid, s=sid: store.workflow_sessions_of(m) == [s],
                "the kept pairs stored",
            )
        assert store.module_links_position() > 0
