"""The coordinator's command contract, proven once per store backend (SQLite file and
the real PostgreSQL): lifecycle, identity, the transition table, linking rules, module
identity, destroy semantics and idempotent command ids."""

from __future__ import annotations

import uuid

from contracts import (
    TRANSITIONS,
    Accepted,
    Command,
    CommandReply,
    CommandRequest,
    CreateWorkflowSession,
    DestroyWorkflowSession,
    ErrorCode,
    LinkModuleSession,
    RecordActivity,
    RegisterModule,
    SessionStatus,
    StatusChanged,
    UnlinkModuleSession,
    UpdateSessionStatus,
    WorkflowConfig,
)
from coordinator.domain.aggregates import Principal
from coordinator.domain.clock import ManualClock
from coordinator.service.coordinator import SessionCoordinator
from tests.coordinator.support import event_types, history, position, rejection

S = SessionStatus
ALL = list(SessionStatus)


async def _setup_modules(coordinator: SessionCoordinator) -> None:
    await coordinator.register_module("executor", required=True)
    await coordinator.register_module("task-loop", required=False)


async def session_in(coordinator: SessionCoordinator, status: SessionStatus) -> uuid.UUID:
    """A live (not destroyed) session in ``status``. Needs executor and task-loop
    registered."""
    if status is S.INITIALIZING:
        created = await coordinator.create_workflow_session(
            ["wait"], WorkflowConfig(required_modules=["executor"])
        )
        return created.session_id
    created = await coordinator.create_workflow_session(
        ["run"], WorkflowConfig(required_modules=[])
    )
    sid = created.session_id
    assert created.status is S.ACTIVE
    if status is S.ACTIVE:
        return sid
    if status is S.CLEANUP:
        # A linked module keeps the session in CLEANUP until it unlinks.
        await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
        await coordinator.destroy_workflow_session(sid)
    else:
        await coordinator.update_session_status(sid, status)
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is status
    assert not session.destroyed
    return sid


def _request(command: Command) -> CommandRequest:
    return CommandRequest(command_id=uuid.uuid4(), issued_at=ManualClock().now(), command=command)


async def test_create_link_activate_destroy_lifecycle(coordinator: SessionCoordinator) -> None:
    """A session starts INITIALIZING, turns ACTIVE when its required module links, goes
    to CLEANUP on destroy and is destroyed once the last linked module unlinks."""
    await _setup_modules(coordinator)
    created = await coordinator.create_workflow_session(["open page", "click"])
    sid = created.session_id
    assert created.status is S.INITIALIZING
    assert created.required_modules == ["executor"]
    assert created.steps == ["open page", "click"]
    assert sid in coordinator.list_active_workflow_sessions()

    loop_session, exec_session = uuid.uuid4(), uuid.uuid4()
    await coordinator.link_module_session(sid, "task-loop", loop_session)
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is S.INITIALIZING, "an optional module does not activate it"

    accepted = await coordinator.link_module_session(sid, "executor", exec_session)
    assert accepted.events == 2, "Linked, then the automatic ACTIVE"
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is S.ACTIVE
    assert session.executor_session_id == exec_session
    assert coordinator.get_linked_sessions(sid) == {
        "executor": exec_session,
        "task-loop": loop_session,
    }
    assert session.modules["executor"].linked_workflow_session_id == sid

    await coordinator.destroy_workflow_session(sid, "done")
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is S.CLEANUP
    assert not session.destroyed
    assert sid not in coordinator.list_active_workflow_sessions()

    await coordinator.unlink_module_session(sid, "executor")
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert not session.destroyed, "task-loop is still linked"
    await coordinator.unlink_module_session(sid, "task-loop")
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.destroyed
    assert session.modules == {}
    assert session.executor_session_id is None
    assert coordinator.get_linked_sessions(sid) == {}
    assert await event_types(coordinator, sid) == [
        "session.created",
        "session.linked",
        "session.linked",
        "session.status-changed",
        "session.status-changed",
        "session.unlinked",
        "session.unlinked",
        "session.destroyed",
    ]
    assert (await coordinator.verify_history(sid)).ok


async def test_ids_are_uuids_and_versions_count_from_one(coordinator: SessionCoordinator) -> None:
    """Session ids and event ids are random UUIDs; a session's events are numbered
    1, 2, 3 … and carry the global positions the store gave them."""
    first = await coordinator.create_workflow_session()
    second = await coordinator.create_workflow_session()
    assert isinstance(first.session_id, uuid.UUID)
    assert first.session_id.version == 4
    assert first.session_id != second.session_id
    events = await history(coordinator, first.session_id)
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    assert all(e.event_id.version == 4 for e in events)
    assert len({e.event_id for e in events}) == len(events)
    page = await coordinator.read_events(0)
    positions = [e.position or 0 for e in page.events]
    assert all(positions)
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


async def test_client_chosen_session_id_is_used_and_cannot_be_created_twice(
    coordinator: SessionCoordinator,
) -> None:
    """A caller may choose the session id; creating the same id again is refused."""
    chosen = uuid.uuid4()
    created = await coordinator.create_workflow_session(session_id=chosen)
    assert created.session_id == chosen
    before = position(coordinator)
    await rejection(
        coordinator.create_workflow_session(session_id=chosen), ErrorCode.SESSION_EXISTS
    )
    assert position(coordinator) == before


async def test_every_invalid_workflow_transition_is_rejected_and_stores_nothing(
    coordinator: SessionCoordinator,
) -> None:
    """Every move the transition table forbids gets INVALID_TRANSITION (SESSION_CLOSED
    out of CLEANUP, which only ends in Destroyed) and appends no event."""
    await _setup_modules(coordinator)
    store = coordinator.store
    assert store is not None
    checked = 0
    for old in ALL:
        sid = await session_in(coordinator, old)
        for new in ALL:
            if new is old or new in TRANSITIONS[old]:
                continue
            before = store.max_position()
            expected = (
                ErrorCode.SESSION_CLOSED if old is S.CLEANUP else ErrorCode.INVALID_TRANSITION
            )
            rejected = await rejection(coordinator.update_session_status(sid, new), expected)
            if expected is ErrorCode.INVALID_TRANSITION:
                assert rejected.field == "status"
                assert rejected.details == {"old_status": old, "new_status": new}
            assert store.max_position() == before
            session = await coordinator.get_workflow_session(sid)
            assert session is not None
            assert session.status is old
            checked += 1
    assert checked == 7 * 6 - sum(len(t) for t in TRANSITIONS.values())


async def test_every_allowed_workflow_transition_is_applied(
    coordinator: SessionCoordinator,
) -> None:
    """Every move the table allows is accepted with one StatusChanged (moving to
    CLEANUP with nothing linked also ends the session)."""
    await _setup_modules(coordinator)
    for old in ALL:
        for new in sorted(TRANSITIONS[old]):
            sid = await session_in(coordinator, old)
            accepted = await coordinator.update_session_status(sid, new)
            session = await coordinator.get_workflow_session(sid)
            assert session is not None
            assert session.status is new, f"{old} -> {new}"
            last = (await history(coordinator, sid))[-accepted.events :]
            assert last[0].type == "session.status-changed"
            changed = last[0].event
            assert isinstance(changed, StatusChanged)
            assert (changed.old_status, changed.new_status) == (old, new)
            nothing_linked = not session.modules
            assert session.destroyed == (new is S.CLEANUP and nothing_linked)


async def test_setting_the_current_status_again_is_a_no_op(
    coordinator: SessionCoordinator,
) -> None:
    """Workflow and module sessions: the same status again appends nothing."""
    await _setup_modules(coordinator)
    before_position = position(coordinator)
    for status in ALL:
        sid = await session_in(coordinator, status)
        before = position(coordinator)
        accepted = await coordinator.update_session_status(sid, status)
        assert accepted.events == 0
        assert position(coordinator) == before
    assert position(coordinator) > before_position

    sid = await session_in(coordinator, S.ACTIVE)
    await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
    same = await coordinator.update_session_status(sid, S.ACTIVE, module_id="task-loop")
    assert same.events == 0
    paused = await coordinator.update_session_status(sid, S.PAUSED, module_id="task-loop")
    assert paused.events == 1
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.modules["task-loop"].status is S.PAUSED


async def test_module_session_status_follows_the_same_table(
    coordinator: SessionCoordinator,
) -> None:
    """A module's own session status obeys the transition table too; a module that
    has not linked cannot set one."""
    await _setup_modules(coordinator)
    sid = await session_in(coordinator, S.ACTIVE)
    await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
    before = position(coordinator)
    await rejection(
        coordinator.update_session_status(sid, S.INITIALIZING, module_id="task-loop"),
        ErrorCode.INVALID_TRANSITION,
    )
    await coordinator.update_session_status(sid, S.COMPLETED, module_id="task-loop")
    await rejection(
        coordinator.update_session_status(sid, S.ACTIVE, module_id="task-loop"),
        ErrorCode.INVALID_TRANSITION,
    )
    await rejection(
        coordinator.update_session_status(sid, S.PAUSED, module_id="executor"),
        ErrorCode.MODULE_NOT_LINKED,
    )
    assert position(coordinator) == before + 1


async def test_link_rules(coordinator: SessionCoordinator) -> None:
    """Linking: unknown session -> UNKNOWN_SESSION; unregistered module ->
    MODULE_NOT_REGISTERED; a second, different link -> MODULE_ALREADY_LINKED; the same
    link again -> no-op. No rejected link stores anything."""
    await _setup_modules(coordinator)
    store = coordinator.store
    assert store is not None
    sid = await session_in(coordinator, S.INITIALIZING)
    first = uuid.uuid4()
    before = store.max_position()

    await rejection(
        coordinator.link_module_session(uuid.uuid4(), "executor", first),
        ErrorCode.UNKNOWN_SESSION,
    )
    await rejection(
        coordinator.link_module_session(sid, "frontend-api", first),
        ErrorCode.MODULE_NOT_REGISTERED,
    )
    assert store.max_position() == before

    linked = await coordinator.link_module_session(sid, "executor", first)
    assert linked.events == 2
    after_link = store.max_position()
    again = await coordinator.link_module_session(sid, "executor", first)
    assert again.events == 0
    assert again.version == linked.version
    rejected = await rejection(
        coordinator.link_module_session(sid, "executor", uuid.uuid4()),
        ErrorCode.MODULE_ALREADY_LINKED,
    )
    assert rejected.module_id == "executor"
    assert store.max_position() == after_link
    assert coordinator.get_linked_sessions(sid) == {"executor": first}


async def test_modules_cannot_link_to_closed_sessions(coordinator: SessionCoordinator) -> None:
    """Only live sessions accept links: CLEANUP and finished sessions answer
    SESSION_CLOSED, destroyed ones SESSION_DESTROYED."""
    await _setup_modules(coordinator)
    for status in (S.CLEANUP, S.COMPLETED, S.FAILED, S.CANCELLED):
        sid = await session_in(coordinator, status)
        await rejection(
            coordinator.link_module_session(sid, "executor", uuid.uuid4()),
            ErrorCode.SESSION_CLOSED,
        )
    sid = await session_in(coordinator, S.ACTIVE)
    await coordinator.destroy_workflow_session(sid)
    await rejection(
        coordinator.link_module_session(sid, "executor", uuid.uuid4()),
        ErrorCode.SESSION_DESTROYED,
    )


async def test_a_module_may_not_act_for_another_module(coordinator: SessionCoordinator) -> None:
    """A principal that may act only for executor cannot link, unlink or update
    task-loop's session (FORBIDDEN, nothing stored), but can do so for executor."""
    await _setup_modules(coordinator)
    store = coordinator.store
    assert store is not None
    sid = await session_in(coordinator, S.ACTIVE)
    loop_session = uuid.uuid4()
    await coordinator.link_module_session(sid, "task-loop", loop_session)
    executor = Principal("x", frozenset({"executor"}))
    before = store.max_position()
    forbidden: list[Command] = [
        LinkModuleSession(session_id=sid, module_id="task-loop", module_session_id=uuid.uuid4()),
        UnlinkModuleSession(session_id=sid, module_id="task-loop"),
        UpdateSessionStatus(session_id=sid, module_id="task-loop", status=S.PAUSED),
        RecordActivity(session_id=sid, module_id="task-loop"),
        RegisterModule(module_id="task-loop"),
    ]
    for command in forbidden:
        rejected = await rejection(coordinator.handle(command, executor), ErrorCode.FORBIDDEN)
        assert rejected.module_id == "task-loop"
    assert store.max_position() == before
    assert coordinator.get_linked_sessions(sid) == {"task-loop": loop_session}

    own = LinkModuleSession(session_id=sid, module_id="executor", module_session_id=uuid.uuid4())
    result = await coordinator.handle(own, executor)
    assert isinstance(result, Accepted)
    assert result.events == 1
    events = await history(coordinator, sid)
    assert events[-1].actor == "x", "the event records who sent the command"


async def test_destroy_goes_through_cleanup_and_twice_is_a_no_op(
    coordinator: SessionCoordinator,
) -> None:
    """Destroy moves to CLEANUP and waits for linked modules; destroying again while
    waiting, or after the session is destroyed, appends nothing."""
    await _setup_modules(coordinator)
    store = coordinator.store
    assert store is not None
    sid = await session_in(coordinator, S.ACTIVE)
    await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
    first = await coordinator.handle(DestroyWorkflowSession(session_id=sid))
    assert isinstance(first, Accepted)
    assert first.events == 1
    second = await coordinator.handle(DestroyWorkflowSession(session_id=sid))
    assert isinstance(second, Accepted)
    assert second.events == 0
    await coordinator.unlink_module_session(sid, "task-loop")
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.destroyed
    before = store.max_position()
    third = await coordinator.handle(DestroyWorkflowSession(session_id=sid))
    assert isinstance(third, Accepted)
    assert third.events == 0
    assert store.max_position() == before
    await rejection(coordinator.update_session_status(sid, S.ACTIVE), ErrorCode.SESSION_DESTROYED)
    await rejection(coordinator.destroy_workflow_session(uuid.uuid4()), ErrorCode.UNKNOWN_SESSION)


async def test_a_session_with_nothing_linked_is_destroyed_at_once(
    coordinator: SessionCoordinator,
) -> None:
    """Destroying a session no module linked to ends it in the same command."""
    created = await coordinator.create_workflow_session()
    assert created.status is S.ACTIVE, "nothing required: ACTIVE immediately"
    accepted = await coordinator.handle(DestroyWorkflowSession(session_id=created.session_id))
    assert isinstance(accepted, Accepted)
    assert accepted.events == 2
    session = await coordinator.get_workflow_session(created.session_id)
    assert session is not None
    assert session.destroyed


async def _replies(
    coordinator: SessionCoordinator, requests: list[CommandRequest]
) -> list[CommandReply]:
    return [await coordinator.execute(r) for r in requests]


async def test_a_retried_command_id_is_applied_once_with_the_same_reply(
    coordinator: SessionCoordinator,
) -> None:
    """The same CommandRequest executed twice appends one set of events and gets the
    identical reply (success or error) both times."""
    store = coordinator.store
    assert store is not None
    register = _request(RegisterModule(module_id="executor", required=False))
    chosen = uuid.uuid4()
    create = _request(CreateWorkflowSession(steps=["a"], session_id=chosen))
    first = await _replies(coordinator, [register, create])
    after_first = store.max_position()
    link = _request(
        LinkModuleSession(session_id=chosen, module_id="executor", module_session_id=uuid.uuid4())
    )
    activity = _request(RecordActivity(session_id=chosen))
    invalid = _request(UpdateSessionStatus(session_id=chosen, status=S.INITIALIZING))
    first += await _replies(coordinator, [link, activity, invalid])
    after_all = store.max_position()
    assert after_all == after_first + 2
    assert [r.error is None for r in first] == [True, True, True, True, False]

    again = await _replies(coordinator, [register, create, link, activity, invalid])
    assert again == first
    assert store.max_position() == after_all
    # A retried create with the same command id does not trip over its own session id.
    assert again[1].result == Accepted(session_id=chosen, version=2, events=2)


async def test_a_retried_command_id_is_recognised_after_a_restart(
    store_url: str, clock: ManualClock
) -> None:
    """Applied command ids survive a restart: after reopening the same store, a retry
    is answered with the original reply and stores nothing."""
    requests = [
        _request(RegisterModule(module_id="executor", required=True)),
        _request(RegisterModule(module_id="task-loop", required=False)),
        _request(CreateWorkflowSession(steps=["a"], session_id=uuid.uuid4())),
    ]
    async with SessionCoordinator(store_url, clock=clock) as first:
        replies = await _replies(first, requests)
        created = replies[2].result
        assert isinstance(created, Accepted)
        sid = created.session_id
        assert sid is not None
        more = [
            _request(
                LinkModuleSession(
                    session_id=sid, module_id="executor", module_session_id=uuid.uuid4()
                )
            ),
            _request(RecordActivity(session_id=sid, module_id="executor")),
            _request(DestroyWorkflowSession(session_id=sid)),
        ]
        requests += more
        replies += await _replies(first, more)
        assert all(r.error is None for r in replies)
        stored = position(first)

    async with SessionCoordinator(store_url, clock=clock) as second:
        assert await _replies(second, requests) == replies
        assert position(second) == stored
        session = await second.get_workflow_session(sid)
        assert session is not None
        assert session.status is S.CLEANUP
        assert list(session.modules) == ["executor"]


async def test_linked_ids_of_executor_streamer_and_ai_surface_on_the_session(
    coordinator: SessionCoordinator,
) -> None:
    """executor, executor-streamer and ai-integration sessions appear as
    executor_session_id, stream_id and ai_connection_id while linked, and are cleared
    when each unlinks from a live session."""
    for module_id in ("executor", "executor-streamer", "ai-integration"):
        await coordinator.register_module(module_id, required=False)
    sid = (await coordinator.create_workflow_session()).session_id
    ids = {m: uuid.uuid4() for m in ("executor", "executor-streamer", "ai-integration")}
    for module_id, module_session in ids.items():
        await coordinator.link_module_session(sid, module_id, module_session)
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert (session.executor_session_id, session.stream_id, session.ai_connection_id) == (
        ids["executor"],
        ids["executor-streamer"],
        ids["ai-integration"],
    )
    await coordinator.unlink_module_session(sid, "executor-streamer")
    await coordinator.unlink_module_session(sid, "executor")
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    assert session.status is S.ACTIVE
    assert (session.executor_session_id, session.stream_id, session.ai_connection_id) == (
        None,
        None,
        ids["ai-integration"],
    )
    assert list(session.modules) == ["ai-integration"]
