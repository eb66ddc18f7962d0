"""Group commit: many concurrent commands are saved in a few transactions, and each
caller still gets its own reply, errors included, without disturbing its batch."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from contracts import (
    Accepted,
    Command,
    CommandReply,
    CommandRequest,
    CreateWorkflowSession,
    ErrorCode,
    LinkModuleSession,
    RecordActivity,
    SessionStatus,
    UpdateSessionStatus,
    WorkflowConfig,
)
from coordinator.domain.aggregates import WorkflowSessionAggregate
from coordinator.domain.clock import ManualClock
from coordinator.errors import CommandRejected
from coordinator.service.coordinator import SessionCoordinator

S = SessionStatus
COMMANDS = 500


async def test_concurrent_commands_share_transactions_and_get_their_own_replies(
    coordinator: SessionCoordinator, clock: ManualClock
) -> None:
    """500 concurrent commands (creates, links, activity, and invalid ones of four
    kinds) commit in far fewer writer passes than commands; every reply answers its own
    command, every rejected one with its own error, and the store holds exactly the
    events of the accepted ones."""
    await coordinator.register_module("executor", required=False)
    existing = [
        (await coordinator.create_workflow_session(config=WorkflowConfig())).session_id
        for _ in range(COMMANDS // 5)
    ]
    writer = coordinator._writer
    store = coordinator.store
    assert writer is not None
    assert store is not None
    batches_before = writer.batches
    position_before = store.max_position()

    commands: list[Command] = []
    expected: list[Accepted | ErrorCode] = []
    links: dict[uuid.UUID, uuid.UUID] = {}
    for i in range(COMMANDS):
        sid = existing[i // 5]
        match i % 5:
            case 0:
                new_id = uuid.uuid4()
                commands.append(CreateWorkflowSession(steps=[f"step {i}"], session_id=new_id))
                expected.append(Accepted(session_id=new_id, version=2, events=2))
            case 1:
                links[sid] = uuid.uuid4()
                commands.append(
                    LinkModuleSession(
                        session_id=sid, module_id="executor", module_session_id=links[sid]
                    )
                )
                expected.append(Accepted(session_id=sid, version=3, events=1))
            case 2:
                # Every fifth group tries an invalid move, the rest record activity.
                if i % 10 == 2:
                    commands.append(UpdateSessionStatus(session_id=sid, status=S.INITIALIZING))
                    expected.append(ErrorCode.INVALID_TRANSITION)
                else:
                    commands.append(RecordActivity(session_id=sid, module_id="executor"))
                    expected.append(Accepted(session_id=sid, version=4, events=1))
            case 3:
                commands.append(
                    LinkModuleSession(
                        session_id=sid, module_id="executor", module_session_id=uuid.uuid4()
                    )
                )
                expected.append(ErrorCode.MODULE_ALREADY_LINKED)
            case _:
                if i % 10 == 4:
                    commands.append(RecordActivity(session_id=uuid.uuid4()))
                    expected.append(ErrorCode.UNKNOWN_SESSION)
                else:
                    commands.append(
                        LinkModuleSession(
                            session_id=sid, module_id="frontend-api", module_session_id=sid
                        )
                    )
                    expected.append(ErrorCode.MODULE_NOT_REGISTERED)
    requests = [
        CommandRequest(command_id=uuid.uuid4(), issued_at=clock.now(), command=command)
        for command in commands
    ]

    replies: list[CommandReply] = await asyncio.gather(*(coordinator.execute(r) for r in requests))

    passes = writer.batches - batches_before
    assert passes <= COMMANDS // 20, f"{COMMANDS} commands took {passes} writer passes"
    for request, reply, want in zip(requests, replies, expected, strict=True):
        assert reply.command_id == request.command_id
        if isinstance(want, ErrorCode):
            assert reply.result is None
            assert reply.error is not None, request.command
            assert reply.error.code is want, (request.command, reply.error)
        else:
            assert reply.error is None, (request.command, reply.error)
            assert reply.result == want
    accepted_events = sum(w.events for w in expected if isinstance(w, Accepted))
    assert store.max_position() - position_before == accepted_events
    for sid in existing:
        session = await coordinator.get_workflow_session(sid)
        assert session is not None
        assert session.status is S.ACTIVE
        assert coordinator.get_linked_sessions(sid) == {"executor": links[sid]}
        assert session.version == (4 if existing.index(sid) % 2 else 3)
        assert (await coordinator.verify_history(sid)).ok


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (RuntimeError("handler bug after the events were triggered"), ErrorCode.INTERNAL),
        (CommandRejected(ErrorCode.CONFLICT, "rule broken after the events"), ErrorCode.CONFLICT),
    ],
    ids=["crash", "rejection"],
)
async def test_a_command_failing_half_way_leaves_no_trace_in_its_batch(
    coordinator: SessionCoordinator,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    code: ErrorCode,
) -> None:
    """A command whose handler fails (crashes, or rejects) after it has already
    triggered events gets its own error and none of its events are stored; the commands
    committed with it in the same batch are unaffected."""
    await coordinator.register_module("executor", required=True)
    sessions = [(await coordinator.create_workflow_session()).session_id for _ in range(20)]
    poisoned = uuid.uuid4()
    original = WorkflowSessionAggregate.link

    def link(self: WorkflowSessionAggregate, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)  # Linked and the automatic ACTIVE are triggered
        if args[2] == poisoned:
            raise failure

    monkeypatch.setattr(WorkflowSessionAggregate, "link", link)
    store = coordinator.store
    assert store is not None
    before = store.max_position()
    links = {sid: uuid.uuid4() for sid in sessions}
    links[sessions[7]] = poisoned
    requests = [
        CommandRequest(
            command_id=uuid.uuid4(),
            issued_at=clock.now(),
            command=LinkModuleSession(session_id=sid, module_id="executor", module_session_id=m),
        )
        for sid, m in links.items()
    ]
    replies = await asyncio.gather(*(coordinator.execute(r) for r in requests))

    for sid, reply in zip(sessions, replies, strict=True):
        session = await coordinator.get_workflow_session(sid)
        assert session is not None
        if sid == sessions[7]:
            assert reply.error is not None
            assert reply.error.code is code
            assert session.status is S.INITIALIZING
            assert session.modules == {}
        else:
            assert reply.result == Accepted(session_id=sid, version=3, events=2)
            assert session.status is S.ACTIVE
    assert store.max_position() - before == 2 * 19
    # The rolled-back aggregate is still usable: linking again succeeds.
    monkeypatch.setattr(WorkflowSessionAggregate, "link", original)
    again = await coordinator.link_module_session(sessions[7], "executor", poisoned)
    assert again == Accepted(session_id=sessions[7], version=3, events=2)
