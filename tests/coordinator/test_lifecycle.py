"""Lifecycle rules the coordinator enforces by itself, driven by a manual clock:
activation, link and inactivity timeouts, module errors, per-module timeouts, cleanup
timeouts with orphan reporting and repair, and timers that survive a restart."""

from __future__ import annotations

import uuid

from contracts import (
    CommandRequest,
    Destroyed,
    ErrorCode,
    ErrorReported,
    ModuleSessionConfig,
    OrphanCleanupRequested,
    OrphanReported,
    RepairResult,
    RepairSessionIntegrity,
    SessionStatus,
    StandardError,
    StatusChanged,
    WorkflowConfig,
    WorkflowSession,
)
from coordinator.domain.clock import ManualClock
from coordinator.service.coordinator import SessionCoordinator
from tests.coordinator.support import event_types, history

S = SessionStatus


async def _modules(coordinator: SessionCoordinator) -> None:
    await coordinator.register_module("executor", required=True)
    await coordinator.register_module("ai-integration", required=True)
    await coordinator.register_module("task-loop", required=False)


async def _get(coordinator: SessionCoordinator, sid: uuid.UUID) -> WorkflowSession:
    session = await coordinator.get_workflow_session(sid)
    assert session is not None
    return session


async def _failure_then_cleanup(coordinator: SessionCoordinator, sid: uuid.UUID) -> list[str]:
    """The coordinator's own failure: FAILED (with the error) immediately followed by
    CLEANUP; returns the tags of the events from the FAILED one on."""
    events = await history(coordinator, sid)
    index = next(
        i
        for i, e in enumerate(events)
        if isinstance(e.event, StatusChanged)
        and e.event.module_id is None
        and e.event.new_status is S.FAILED
    )
    failed, cleanup = events[index].event, events[index + 1].event
    assert isinstance(failed, StatusChanged)
    assert failed.error is not None
    assert isinstance(cleanup, StatusChanged)
    assert (cleanup.old_status, cleanup.new_status) == (S.FAILED, S.CLEANUP)
    assert events[index].actor == "coordinator"
    return [e.type for e in events[index:]]


async def test_active_once_every_required_module_linked(coordinator: SessionCoordinator) -> None:
    """INITIALIZING until the last required module links; optional ones do not count."""
    await _modules(coordinator)
    sid = (await coordinator.create_workflow_session()).session_id
    assert (await _get(coordinator, sid)).required_modules == ["ai-integration", "executor"]
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
    assert (await _get(coordinator, sid)).status is S.INITIALIZING
    ai = uuid.uuid4()
    await coordinator.link_module_session(sid, "ai-integration", ai)
    session = await _get(coordinator, sid)
    assert session.status is S.ACTIVE
    assert session.ai_connection_id == ai


async def test_active_immediately_when_nothing_is_required(
    coordinator: SessionCoordinator,
) -> None:
    """No required module (none registered, or an empty override): ACTIVE at creation."""
    bare = await coordinator.create_workflow_session()
    assert bare.status is S.ACTIVE
    await _modules(coordinator)
    override = await coordinator.create_workflow_session(config=WorkflowConfig(required_modules=[]))
    assert override.status is S.ACTIVE
    assert override.required_modules == []


async def test_link_timeout_fails_then_cleans_up_then_destroys(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """A required module that does not link in time: FAILED with LINK_TIMEOUT recorded,
    CLEANUP, and destroyed once what did link unlinks."""
    await _modules(coordinator)
    config = WorkflowConfig(link_timeout_ms=5_000)
    sid = (await coordinator.create_workflow_session(config=config)).session_id
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())

    clock.advance(milliseconds=4_999)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).status is S.INITIALIZING

    clock.advance(milliseconds=1)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.status is S.CLEANUP
    assert session.failure is not None
    assert session.failure.code is ErrorCode.LINK_TIMEOUT
    assert "ai-integration" in session.failure.message
    assert not session.destroyed, "executor is linked and must unlink first"
    assert await _failure_then_cleanup(coordinator, sid) == [
        "session.status-changed",
        "session.status-changed",
    ]

    await coordinator.unlink_module_session(sid, "executor")
    session = await _get(coordinator, sid)
    assert session.destroyed
    assert (await event_types(coordinator, sid))[-1] == "session.destroyed"


async def test_link_timeout_with_nothing_linked_destroys_at_once(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """Nothing linked when the link timeout fires: FAILED, CLEANUP and Destroyed in one
    pass."""
    await _modules(coordinator)
    sid = (
        await coordinator.create_workflow_session(config=WorkflowConfig(link_timeout_ms=1_000))
    ).session_id
    clock.advance(seconds=1)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.destroyed
    assert session.failure is not None
    assert session.failure.code is ErrorCode.LINK_TIMEOUT
    assert await _failure_then_cleanup(coordinator, sid) == [
        "session.status-changed",
        "session.status-changed",
        "session.destroyed",
    ]
    assert sid not in coordinator.list_active_workflow_sessions()


async def test_fatal_error_of_a_required_module_fails_the_session(
    coordinator: SessionCoordinator,
) -> None:
    """A required module's fatal ReportError: the error is recorded, the session FAILS
    with MODULE_ERROR and moves to CLEANUP."""
    await _modules(coordinator)
    sid = (await coordinator.create_workflow_session()).session_id
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    await coordinator.link_module_session(sid, "ai-integration", uuid.uuid4())
    error = StandardError(code=ErrorCode.INTERNAL, message="browser crashed", module_id="executor")
    accepted = await coordinator.report_error(sid, error, module_id="executor")
    assert accepted.events == 3, "ErrorReported, FAILED, CLEANUP"
    session = await _get(coordinator, sid)
    assert session.status is S.CLEANUP
    assert session.failure is not None
    assert session.failure.code is ErrorCode.MODULE_ERROR
    assert session.failure.module_id == "executor"
    assert "browser crashed" in session.failure.message
    events = await history(coordinator, sid)
    reported = [e.event for e in events if isinstance(e.event, ErrorReported)]
    assert reported == [ErrorReported(error=error, module_id="executor")]


async def test_optional_module_errors_and_non_fatal_errors_are_only_recorded(
    coordinator: SessionCoordinator,
) -> None:
    """An optional module's fatal error, or a required module's non-fatal one, is
    recorded and changes no status."""
    await _modules(coordinator)
    sid = (
        await coordinator.create_workflow_session(config=WorkflowConfig(required_modules=[]))
    ).session_id
    await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
    error = StandardError(code=ErrorCode.TIMEOUT, message="step slow")
    assert (await coordinator.report_error(sid, error, module_id="task-loop")).events == 1

    required = (await coordinator.create_workflow_session()).session_id
    await coordinator.link_module_session(required, "executor", uuid.uuid4())
    await coordinator.link_module_session(required, "ai-integration", uuid.uuid4())
    assert (
        await coordinator.report_error(required, error, module_id="executor", fatal=False)
    ).events == 1

    for session_id in (sid, required):
        session = await _get(coordinator, session_id)
        assert session.status is S.ACTIVE
        assert session.failure is None
        assert (await event_types(coordinator, session_id))[-1] == "session.error-reported"


async def test_required_module_failing_its_session_fails_the_workflow(
    coordinator: SessionCoordinator,
) -> None:
    """A required module that sets its own session FAILED fails the workflow session."""
    await _modules(coordinator)
    sid = (await coordinator.create_workflow_session()).session_id
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    await coordinator.link_module_session(sid, "ai-integration", uuid.uuid4())
    await coordinator.update_session_status(
        sid, S.FAILED, module_id="ai-integration", reason="quota"
    )
    session = await _get(coordinator, sid)
    assert session.status is S.CLEANUP
    assert session.failure is not None
    assert session.failure.code is ErrorCode.MODULE_ERROR
    assert session.modules["ai-integration"].status is S.FAILED


async def test_inactivity_timeout_fires_without_activity(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """config.timeout_ms: no activity for that long -> FAILED (INACTIVITY_TIMEOUT),
    CLEANUP, destroyed (nothing linked)."""
    sid = (
        await coordinator.create_workflow_session(config=WorkflowConfig(timeout_ms=10_000))
    ).session_id
    clock.advance(milliseconds=9_999)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).status is S.ACTIVE
    clock.advance(milliseconds=1)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.destroyed
    assert session.failure is not None
    assert session.failure.code is ErrorCode.INACTIVITY_TIMEOUT


async def test_recorded_activity_postpones_the_inactivity_timeout(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """Activity (of the workflow or a linked module) resets the inactivity clock."""
    await _modules(coordinator)
    config = WorkflowConfig(timeout_ms=10_000, required_modules=[])
    sid = (await coordinator.create_workflow_session(config=config)).session_id
    await coordinator.link_module_session(sid, "task-loop", uuid.uuid4())
    for module_id in (None, "task-loop", None):
        clock.advance(seconds=8)
        await coordinator.run_timeouts()
        await coordinator.record_activity(sid, module_id)
    clock.advance(seconds=8)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).status is S.ACTIVE, "32 s old, active 8 s ago"
    clock.advance(seconds=2)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.status is S.CLEANUP
    assert session.failure is not None
    assert session.failure.code is ErrorCode.INACTIVITY_TIMEOUT


async def test_paused_sessions_are_exempt_from_the_inactivity_timeout(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """PAUSED is the way to be idle on purpose; resuming starts the clock afresh."""
    sid = (
        await coordinator.create_workflow_session(config=WorkflowConfig(timeout_ms=1_000))
    ).session_id
    await coordinator.update_session_status(sid, S.PAUSED)
    clock.advance(seconds=3600)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).status is S.PAUSED
    await coordinator.update_session_status(sid, S.ACTIVE)
    clock.advance(milliseconds=999)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).status is S.ACTIVE
    clock.advance(milliseconds=1)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).destroyed


async def test_module_timeout_fails_an_optional_module_session_only(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """ModuleSessionConfig.timeout_ms on link: an idle optional module's session FAILS
    (INACTIVITY_TIMEOUT); the workflow session stays ACTIVE; its activity postpones it."""
    await _modules(coordinator)
    sid = (
        await coordinator.create_workflow_session(config=WorkflowConfig(required_modules=[]))
    ).session_id
    await coordinator.link_module_session(
        sid, "task-loop", uuid.uuid4(), config=ModuleSessionConfig(timeout_ms=2_000)
    )
    clock.advance(milliseconds=1_500)
    await coordinator.record_activity(sid, "task-loop")
    clock.advance(milliseconds=1_999)
    await coordinator.run_timeouts()
    assert (await _get(coordinator, sid)).modules["task-loop"].status is S.ACTIVE
    clock.advance(milliseconds=1)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.modules["task-loop"].status is S.FAILED
    assert session.status is S.ACTIVE
    last = (await history(coordinator, sid))[-1].event
    assert isinstance(last, StatusChanged)
    assert last.module_id == "task-loop"
    assert last.error is not None
    assert last.error.code is ErrorCode.INACTIVITY_TIMEOUT
    # A failed module session has no timer any more.
    clock.advance(seconds=3600)
    await coordinator.run_timeouts()
    assert (await history(coordinator, sid))[-1].event == last


async def test_module_timeout_of_a_required_module_fails_the_workflow(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """A required module's per-module timeout fails its session and the workflow."""
    await _modules(coordinator)
    config = WorkflowConfig(
        required_modules=["executor"],
        module_configs={"executor": ModuleSessionConfig(timeout_ms=3_000)},
    )
    sid = (await coordinator.create_workflow_session(config=config)).session_id
    # No config on the link: the workflow's module_configs entry applies.
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    assert (await _get(coordinator, sid)).modules["executor"].config.timeout_ms == 3_000
    clock.advance(seconds=3)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.modules["executor"].status is S.FAILED
    assert session.status is S.CLEANUP
    assert session.failure is not None
    assert session.failure.code is ErrorCode.INACTIVITY_TIMEOUT
    assert session.failure.module_id == "executor"


async def test_cleanup_timeout_destroys_and_reports_orphans_then_repair_clears_them(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """Modules that do not unlink within cleanup_timeout_ms: the session is Destroyed
    with ``orphaned`` naming them, integrity validation lists them, and repair asks each
    module to clean up (OrphanCleanupRequested in the feed), after which the report is
    clean."""
    await _modules(coordinator)
    config = WorkflowConfig(cleanup_timeout_ms=4_000, required_modules=[])
    sid = (await coordinator.create_workflow_session(config=config)).session_id
    executor_session, loop_session, ai_session = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await coordinator.link_module_session(sid, "executor", executor_session)
    await coordinator.link_module_session(sid, "task-loop", loop_session)
    await coordinator.link_module_session(sid, "ai-integration", ai_session)
    await coordinator.destroy_workflow_session(sid)
    await coordinator.unlink_module_session(sid, "ai-integration")

    clock.advance(milliseconds=3_999)
    await coordinator.run_timeouts()
    assert not (await _get(coordinator, sid)).destroyed
    clock.advance(milliseconds=1)
    await coordinator.run_timeouts()
    session = await _get(coordinator, sid)
    assert session.destroyed
    destroyed = (await history(coordinator, sid))[-1].event
    assert isinstance(destroyed, Destroyed)
    assert destroyed.orphaned == {"executor": executor_session, "task-loop": loop_session}

    report = await coordinator.validate_session_integrity(sid)
    assert report.orphaned_sessions == {"executor": executor_session, "task-loop": loop_session}
    assert not report.is_valid
    assert any("orphaned" in r for r in report.recommendations)
    feed = await coordinator.read_events(0)
    reported = [e.event for e in feed.events if isinstance(e.event, OrphanReported)]
    assert {(o.module_id, o.module_session_id) for o in reported} == {
        ("executor", executor_session),
        ("task-loop", loop_session),
    }

    position = (await coordinator.read_events(0)).next_position
    repaired = await coordinator.repair_session_integrity(sid)
    assert len(repaired.actions) == 2
    requested = [
        e.event
        for e in (await coordinator.read_events(position)).events
        if isinstance(e.event, OrphanCleanupRequested)
    ]
    assert {(r.module_id, r.module_session_id, r.workflow_session_id) for r in requested} == {
        ("executor", executor_session, sid),
        ("task-loop", loop_session, sid),
    }
    assert repaired.report.orphaned_sessions == {}
    after = await coordinator.validate_session_integrity(sid)
    assert after.orphaned_sessions == {}
    assert after.is_valid
    assert after.recommendations == []


async def test_a_retried_repair_gets_the_same_reply(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """The same RepairSessionIntegrity request sent twice is applied once and both
    replies list the same actions."""
    await _modules(coordinator)
    config = WorkflowConfig(cleanup_timeout_ms=1_000, required_modules=[])
    sid = (await coordinator.create_workflow_session(config=config)).session_id
    await coordinator.link_module_session(sid, "executor", uuid.uuid4())
    await coordinator.destroy_workflow_session(sid)
    clock.advance(milliseconds=1_000)
    await coordinator.run_timeouts()
    request = CommandRequest(
        command_id=uuid.uuid4(),
        issued_at=clock.now(),
        command=RepairSessionIntegrity(session_id=sid),
    )
    first = await coordinator.execute(request)
    position = (await coordinator.read_events(0)).next_position
    second = await coordinator.execute(request)
    assert first == second
    assert isinstance(first.result, RepairResult)
    assert len(first.result.actions) == 1
    assert (await coordinator.read_events(0)).next_position == position


async def test_timers_survive_a_restart(store_url: str, clock: ManualClock) -> None:
    """Deadlines are re-armed from the projections: a link timeout, an inactivity
    timeout and a cleanup timeout armed before a restart fire after it."""
    async with SessionCoordinator(store_url, clock=clock) as first:
        await _modules(first)
        linking = (
            await first.create_workflow_session(config=WorkflowConfig(link_timeout_ms=60_000))
        ).session_id
        idle = (
            await first.create_workflow_session(
                config=WorkflowConfig(required_modules=[], timeout_ms=60_000)
            )
        ).session_id
        cleaning = (
            await first.create_workflow_session(
                config=WorkflowConfig(required_modules=[], cleanup_timeout_ms=60_000)
            )
        ).session_id
        loop_session = uuid.uuid4()
        await first.link_module_session(cleaning, "task-loop", loop_session)
        await first.destroy_workflow_session(cleaning)

    async with SessionCoordinator(store_url, clock=clock) as second:
        clock.advance(seconds=59)
        await second.run_timeouts()
        assert sorted(second.list_active_workflow_sessions()) == sorted([linking, idle])
        assert not (await _get(second, cleaning)).destroyed
        clock.advance(seconds=1)
        await second.run_timeouts()
        for sid, code in (
            (linking, ErrorCode.LINK_TIMEOUT),
            (idle, ErrorCode.INACTIVITY_TIMEOUT),
        ):
            session = await _get(second, sid)
            assert session.destroyed
            assert session.failure is not None
            assert session.failure.code is code
        gone = await _get(second, cleaning)
        assert gone.destroyed
        destroyed = (await history(second, cleaning))[-1].event
        assert isinstance(destroyed, Destroyed)
        assert destroyed.orphaned == {"task-loop": loop_session}
        assert second.list_active_workflow_sessions() == []
