"""The command server on RabbitMQ: every SessionCoordinator method of the seed answers
over the bus with its typed result; a retried command is applied once; bad input gets
a typed error reply and a dead letter; an unidentified sender is refused."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import pytest

from contracts import (
    HEADERS,
    Accepted,
    Codec,
    Command,
    CommandReply,
    CommandRequest,
    CoordinatorHealth,
    CreateWorkflowSession,
    ErrorCode,
    EventsPage,
    ModuleInfo,
    RecordActivity,
    RepairResult,
    SessionHistory,
    SessionIntegrityReport,
    SessionsPage,
    SessionStatus,
    StandardError,
    WorkflowConfig,
    WorkflowSession,
    new_id,
)
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CommandFailed, CoordinatorClient
from tests.bus.conftest import Bus
from tests.bus.support import dead_letters, wait_destroyed
from transport.port import OutgoingMessage, Transport

pytestmark = pytest.mark.broker

S = SessionStatus
JSON = Codec("json")


async def max_position(runtime: CoordinatorRuntime) -> int:
    store = runtime.coordinator.store
    assert store is not None
    return await asyncio.to_thread(store.max_position)


async def raw_request(
    transport: Transport,
    runtime: CoordinatorRuntime,
    body: bytes,
    *,
    content_type: str = "application/json",
    user_id: str | None = "guest",
) -> CommandReply:
    """Send any body to the commands queue and decode the reply."""
    reply = await transport.request(
        runtime.topology.commands_queue(),
        OutgoingMessage(
            body=body,
            content_type=content_type,
            correlation_id=str(new_id()),
            user_id=user_id,
            persistent=False,
        ),
        timeout=10,
    )
    return JSON.decode_reply(reply.body)


def request_body(command: object, command_id: uuid.UUID | None = None) -> bytes:
    return JSON.encode(
        CommandRequest(
            command_id=command_id or new_id(),
            issued_at=datetime.now(UTC),
            command=command,  # type: ignore[arg-type]
        )
    )


async def test_every_coordinator_method_answers_with_its_typed_result(amqp_bus: Bus) -> None:
    async with amqp_bus.runtime() as rt:
        c = await amqp_bus.client()

        registered = await c.register_module("executor", required=True, capabilities=["browser"])
        assert isinstance(registered, Accepted)
        assert registered.events == 1
        again = await c.register_module("executor", required=True, capabilities=["browser"])
        assert again.events == 0  # the same registration: a no-op, not an error
        await c.register_module("task-loop", required=False)
        modules = await c.list_modules()
        assert all(isinstance(m, ModuleInfo) for m in modules)
        assert {m.module_id: m.required for m in modules} == {"executor": True, "task-loop": False}
        executor = await c.get_module("executor")
        assert isinstance(executor, ModuleInfo)
        assert executor.capabilities == ["browser"]
        assert await c.get_module("nobody") is None

        session = await c.create_workflow_session(
            ["open", "click"], WorkflowConfig(metadata={"user": "u1"})
        )
        assert isinstance(session, WorkflowSession)
        assert (session.status, session.steps, session.required_modules) == (
            S.INITIALIZING,
            ["open", "click"],
            ["executor"],
        )
        sid = session.session_id
        msid = new_id()
        linked = await c.link_module_session(sid, "executor", msid, metadata={"engine": "x"})
        assert isinstance(linked, Accepted)
        assert linked.session_id == sid
        assert linked.events == 2  # Linked, then ACTIVE: every required module linked
        assert await c.get_linked_sessions(sid) == {"executor": msid}
        current = await c.get_workflow_session(sid)
        assert isinstance(current, WorkflowSession)
        assert (current.status, current.executor_session_id) == (S.ACTIVE, msid)
        assert current.modules["executor"].metadata == {"engine": "x"}
        assert current.metadata == {"user": "u1"}
        assert await c.get_workflow_session(new_id()) is None

        assert await c.list_active_workflow_sessions() == [sid]
        assert await c.list_active_workflow_sessions(status=S.PAUSED) == []
        assert await c.list_active_workflow_sessions(module_id="executor") == [sid]
        listed = await c.list_workflow_sessions()
        assert [s.session_id for s in listed] == [sid]

        assert isinstance(await c.update_session_status(sid, S.PAUSED), Accepted)
        assert await c.list_active_workflow_sessions(status=S.PAUSED) == [sid]
        await c.update_session_status(sid, S.ACTIVE)
        same = await c.update_session_status(sid, S.ACTIVE)
        assert same.events == 0  # setting the current status again is a no-op
        await c.update_session_status(sid, S.PAUSED, module_id="executor")
        assert isinstance(await c.record_activity(sid, "executor"), Accepted)
        error = StandardError(code=ErrorCode.MODULE_ERROR, message="slow page")
        assert isinstance(
            await c.report_error(sid, error, module_id="executor", fatal=False), Accepted
        )
        with pytest.raises(CommandFailed) as refused:
            await c.update_session_status(sid, S.INITIALIZING)
        assert refused.value.code is ErrorCode.INVALID_TRANSITION

        history = await c.get_session_history(sid)
        assert isinstance(history, SessionHistory)
        assert [e.version for e in history.events] == list(range(1, len(history.events) + 1))
        assert history.state == await c.get_workflow_session(sid)
        early = await c.get_session_history(sid, version=2)
        assert early.state is not None
        assert early.state.version == 2
        page = await c.read_events(0, limit=5)
        assert isinstance(page, EventsPage)
        assert [e.position for e in page.events] == [1, 2, 3, 4, 5]
        assert page.next_position == 5
        only = await c.read_events(0, session_id=sid)
        assert {e.session_id for e in only.events} == {sid}

        health = await c.get_coordinator_health()
        assert isinstance(health, CoordinatorHealth)
        assert health.registered_modules == ["executor", "task-loop"]
        assert health.total_workflow_sessions == 1
        report = await c.validate_session_integrity(sid)
        assert isinstance(report, SessionIntegrityReport)
        assert report.workflow_session_id == sid
        assert report.linked_modules == ["executor"]

        other = await c.create_workflow_session(["x"])
        orphan = new_id()
        assert isinstance(await c.report_orphan(other.session_id, "executor", orphan), Accepted)
        repaired = await c.repair_session_integrity(other.session_id)
        assert isinstance(repaired, RepairResult)
        assert isinstance(repaired.report, SessionIntegrityReport)

        assert isinstance(await c.unlink_module_session(sid, "executor"), Accepted)
        assert await c.get_linked_sessions(sid) == {}
        assert await c.destroy_workflow_session(sid, reason="done") is None
        await wait_destroyed(rt, sid)
        ended = await c.get_workflow_session(sid)  # still readable, from its history
        assert ended is not None
        assert (ended.destroyed, ended.status) == (True, S.CLEANUP)
        with pytest.raises(CommandFailed) as gone:
            await c.record_activity(sid)
        assert gone.value.code is ErrorCode.SESSION_DESTROYED
        assert isinstance(await c.unregister_module("task-loop", reason="retired"), Accepted)
        assert [m.module_id for m in await c.list_modules()] == ["executor"]


async def test_retried_command_is_applied_once_and_both_replies_are_identical(
    amqp_bus: Bus,
) -> None:
    async with amqp_bus.runtime() as rt:
        c = await amqp_bus.client()
        session = await c.create_workflow_session(["s"])
        sid = session.session_id

        # RecordActivity appends an event every time it is applied: a good witness.
        command_id = new_id()
        before = await max_position(rt)
        first = await c.call(RecordActivity(session_id=sid), command_id=command_id)
        after_first = await max_position(rt)
        second = await c.call(RecordActivity(session_id=sid), command_id=command_id)
        assert first == second
        assert isinstance(first, Accepted)
        assert first.events == 1
        assert after_first == before + 1
        assert await max_position(rt) == after_first

        # On the wire, byte for byte: the same request twice, the same reply twice.
        raw = request_body(RecordActivity(session_id=sid), new_id())
        transport = c.transport
        replies = [await raw_request(transport, rt, raw) for _ in range(2)]
        assert replies[0] == replies[1]
        assert JSON.encode(replies[0]) == JSON.encode(replies[1])
        assert await max_position(rt) == after_first + 1

        # A retried create with the caller's session id cannot make two sessions.
        create = CreateWorkflowSession(steps=["t"], session_id=new_id())
        create_id = new_id()
        made = await c.call(create, command_id=create_id)
        remade = await c.call(create, command_id=create_id)
        assert made == remade
        assert len(await c.list_active_workflow_sessions()) == 2


async def test_undecodable_command_gets_an_error_reply_and_a_dead_letter(amqp_bus: Bus) -> None:
    async with amqp_bus.runtime() as rt:
        c = await amqp_bus.client()
        transport = c.transport
        before = await max_position(rt)

        garbage = await raw_request(transport, rt, b"{this is not json")
        assert garbage.error is not None
        assert garbage.error.code is ErrorCode.INVALID_MESSAGE
        assert garbage.command_id == uuid.UUID(int=0)

        # Well-formed JSON, wrong shape: the command id is salvaged, the field named.
        command_id = new_id()
        wrong = msgspec.json.encode(
            {
                "command_id": str(command_id),
                "issued_at": datetime.now(UTC).isoformat(),
                "command": {"type": "record-activity", "session_id": "not-a-uuid"},
            }
        )
        shaped = await raw_request(transport, rt, wrong)
        assert shaped.error is not None
        assert shaped.error.code is ErrorCode.INVALID_MESSAGE
        assert shaped.command_id == command_id
        assert shaped.error.field == "$.command.session_id"

        unknown_type = await raw_request(transport, rt, b"hello", content_type="text/plain")
        assert unknown_type.error is not None
        assert unknown_type.error.code is ErrorCode.INVALID_MESSAGE
        assert unknown_type.error.field == "content_type"

        huge = await raw_request(transport, rt, b" " * ((1 << 20) + 1))
        assert huge.error is not None
        assert huge.error.code is ErrorCode.MESSAGE_TOO_LARGE

        dead = await dead_letters(transport, rt.topology, 4)
        by_body = {d.body[:20]: d for d in dead}
        first = by_body[b"{this is not json"]
        assert first.headers[HEADERS.REJECT_CODE] == ErrorCode.INVALID_MESSAGE
        assert "malformed json" in str(first.headers[HEADERS.REJECT_REASON])
        assert first.headers[HEADERS.REJECTED_BY] == "coordinator"
        assert first.headers["x-original-routing-key"] == rt.topology.commands_queue()
        second = by_body[wrong[:20]]
        assert second.headers[HEADERS.REJECT_FIELD] == "$.command.session_id"
        assert by_body[b"hello"].headers[HEADERS.REJECT_FIELD] == "content_type"
        assert by_body[b" " * 20].headers[HEADERS.REJECT_CODE] == ErrorCode.MESSAGE_TOO_LARGE

        # Nothing was stored, and the server keeps serving.
        assert await max_position(rt) == before
        health = await c.get_coordinator_health()
        assert health.total_workflow_sessions == 0
        assert rt.server.rejected == 4


async def test_command_from_an_unknown_or_missing_user_id_is_forbidden(amqp_bus: Bus) -> None:
    # guest may connect, but the coordinator knows only "ops" as a sender.
    async with amqp_bus.runtime(identity="ops=*") as rt:
        transport = await amqp_bus.connect("stranger")
        create = request_body(CreateWorkflowSession(steps=["s"]))

        unknown = await raw_request(transport, rt, create, user_id="guest")
        assert unknown.error is not None
        assert unknown.error.code is ErrorCode.FORBIDDEN
        assert "guest" in unknown.error.message

        anonymous = await raw_request(transport, rt, create, user_id=None)
        assert anonymous.error is not None
        assert anonymous.error.code is ErrorCode.FORBIDDEN

        assert await max_position(rt) == 0
        assert rt.coordinator.projections.sessions == {}


R = TypeVar("R")


class _DestroysAfterFirstPage(CoordinatorClient):
    """A client that, once it has the first page of a listing, has the first session
    on it destroyed: what a module catching up meets when sessions end meanwhile."""

    runtime: CoordinatorRuntime | None = None
    struck = False

    async def _expect(self, command: Command, kind: type[R], **kwargs: Any) -> R:
        result = await super()._expect(command, kind, **kwargs)
        if isinstance(result, SessionsPage) and not self.struck and self.runtime is not None:
            self.struck = True
            victim = result.sessions[0].session_id
            await self.destroy_workflow_session(victim)
            await wait_destroyed(self.runtime, victim)
        return result


async def test_a_listing_skips_no_live_session_when_sessions_end_between_pages(
    bus: Bus,
) -> None:
    """Sessions are listed page by page after the last one's key, not by offset: one
    destroyed after the first page shifts none of the others past the next page."""
    async with bus.runtime() as rt:
        client = await bus.client()
        sids = [(await client.create_workflow_session([f"s{i}"])).session_id for i in range(7)]
        lister = _DestroysAfterFirstPage(await bus.connect("lister"), bus.topology)
        lister.runtime = rt
        listed = await lister.list_workflow_sessions(page_size=2)
        assert lister.struck
        # The destroyed one was listed on the first page, before it ended; every other
        # one once, in creation order.
        assert [s.session_id for s in listed] == sids
        snapshot = await lister.snapshot_workflow_sessions(page_size=2)
        assert [s.session_id for s in snapshot.sessions] == sids[1:]
        assert 0 < snapshot.position <= rt.coordinator.projections.position
