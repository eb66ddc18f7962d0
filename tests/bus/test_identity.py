"""Identity on the real broker, with one broker user per module: the coordinator knows
who sent a command from the broker-validated AMQP ``user_id``, so a module may act only
for its own module sessions, and a forged ``user_id`` never reaches the coordinator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from contracts import (
    Codec,
    CommandRequest,
    ErrorCode,
    Heartbeat,
    SessionManagerHealth,
    SessionStatus,
    StandardError,
    UnlinkModuleSession,
    new_id,
)
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CommandFailed
from module_sdk.testing import wait_for
from tests.bus.conftest import BrokerUsers, Bus
from tests.bus.support import RecordingModule, wait_status
from transport.port import AccessRefused, OutgoingMessage

pytestmark = pytest.mark.broker

JSON = Codec("json")


@pytest.fixture
def module_users(broker_users: BrokerUsers) -> dict[str, dict[str, str]]:
    """Broker users of their own for the executor and the task loop."""
    return {"executor": broker_users("executor"), "task-loop": broker_users("taskloop")}


async def max_position(runtime: CoordinatorRuntime) -> int:
    store = runtime.coordinator.store
    assert store is not None
    return await asyncio.to_thread(store.max_position)


async def test_a_module_may_act_only_for_its_own_module_sessions(
    amqp_bus: Bus, module_users: dict[str, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionbus.coordinator.server")
    executor_user = module_users["executor"]["user"]
    taskloop_user = module_users["task-loop"]["user"]
    identity = f"{executor_user}=executor;{taskloop_user}=task-loop;guest=*"
    async with amqp_bus.runtime(identity=identity) as rt:
        executor = amqp_bus.module(
            RecordingModule,
            module_id="executor",
            credentials=module_users["executor"],
        )
        taskloop = amqp_bus.module(
            RecordingModule,
            module_id="task-loop",
            credentials=module_users["task-loop"],
        )
        async with executor, taskloop:
            assert (executor.transport.user, taskloop.transport.user) == (
                executor_user,
                taskloop_user,
            )
            ops = await amqp_bus.client("ops")
            sid = (await ops.create_workflow_session(["s"])).session_id
            # Each module linked as its own broker user, and that is who the store says acted.
            await wait_status(rt, sid, SessionStatus.ACTIVE)
            history = (await ops.get_session_history(sid)).events
            actors = {e.event.module_id: e.actor for e in history if e.type == "session.linked"}  # type: ignore[union-attr]
            assert actors == {"executor": executor_user, "task-loop": taskloop_user}

            before = await max_position(rt)
            c = executor.client
            error = StandardError(code=ErrorCode.MODULE_ERROR, message="not mine to say")
            trespasses: dict[str, Callable[[], Awaitable[Any]]] = {
                "link": lambda: c.link_module_session(sid, "task-loop", new_id()),
                "unlink": lambda: c.unlink_module_session(sid, "task-loop"),
                "update": lambda: c.update_session_status(
                    sid, SessionStatus.FAILED, module_id="task-loop"
                ),
                "report": lambda: c.report_error(sid, error, module_id="task-loop"),
                "activity": lambda: c.record_activity(sid, "task-loop"),
                "orphan": lambda: c.report_orphan(sid, "task-loop", new_id()),
                "register": lambda: c.register_module("task-loop", required=False),
                "unregister": lambda: c.unregister_module("task-loop"),
            }
            for name, trespass in trespasses.items():
                with pytest.raises(CommandFailed) as refused:
                    await trespass()
                assert refused.value.code is ErrorCode.FORBIDDEN, name
                assert taskloop_user not in refused.value.error.message
            with pytest.raises(CommandFailed) as refused:
                await taskloop.client.unlink_module_session(sid, "executor")
            assert refused.value.code is ErrorCode.FORBIDDEN
            assert await max_position(rt) == before
            session = rt.coordinator.projections.sessions[sid]
            assert set(session.modules) == {"executor", "task-loop"}
            assert session.modules["task-loop"].status is SessionStatus.ACTIVE

            # Acting for itself is fine.
            await executor.record_activity(sid)
            await executor.update_session_status(sid, SessionStatus.PAUSED)
            assert await max_position(rt) == before + 2

            # A heartbeat for another module is not counted for it.
            heartbeat = Heartbeat(
                module_id="task-loop",
                instance_id=new_id(),
                sent_at=datetime.now(UTC),
                interval_ms=1000,
                health=SessionManagerHealth(
                    module_id="task-loop",
                    is_healthy=False,
                    active_sessions=0,
                    total_sessions=0,
                    last_health_check=datetime.now(UTC),
                ),
            )
            await executor.transport.publish(
                rt.topology.heartbeats_exchange,
                "",
                OutgoingMessage(
                    body=JSON.encode(heartbeat),
                    content_type=JSON.content_type,
                    user_id=executor_user,
                ),
            )
            await wait_for(
                lambda: any(
                    f"heartbeat for task-loop from broker user {executor_user!r} ignored"
                    in r.getMessage()
                    for r in caplog.records
                ),
                timeout=10,
                what="the forged heartbeat to be ignored",
            )


async def test_a_forged_user_id_is_refused_by_the_broker(
    amqp_bus: Bus, module_users: dict[str, dict[str, str]]
) -> None:
    executor_user = module_users["executor"]["user"]
    taskloop_user = module_users["task-loop"]["user"]
    identity = f"{executor_user}=executor;{taskloop_user}=task-loop;guest=*"
    async with amqp_bus.runtime(identity=identity) as rt:
        ops = await amqp_bus.client("ops")
        await ops.register_module("task-loop", required=True)
        sid = (await ops.create_workflow_session(["s"])).session_id
        await ops.link_module_session(sid, "task-loop", new_id())
        before = await max_position(rt)
        answered = rt.server.handled + rt.server.rejected

        executor = await amqp_bus.connect("executor", **module_users["executor"])
        unlink = CommandRequest(
            command_id=new_id(),
            issued_at=datetime.now(UTC),
            command=UnlinkModuleSession(session_id=sid, module_id="task-loop"),
        )
        forged = OutgoingMessage(
            body=JSON.encode(unlink),
            content_type=JSON.content_type,
            correlation_id=str(new_id()),
            user_id=taskloop_user,  # not who this connection logged in as
        )
        with pytest.raises(AccessRefused, match="user_id"):
            await executor.publish("", rt.topology.commands_queue(), forged)

        # Nothing reached the coordinator; the executor's connection still works.
        assert rt.server.handled + rt.server.rejected == answered
        assert await max_position(rt) == before
        assert "task-loop" in rt.coordinator.projections.sessions[sid].modules
        honest = OutgoingMessage(
            body=JSON.encode(unlink),
            content_type=JSON.content_type,
            correlation_id=str(new_id()),
            user_id=executor_user,
        )
        reply = JSON.decode_reply(
            (await executor.request(rt.topology.commands_queue(), honest, timeout=10)).body
        )
        assert reply.error is not None
        assert reply.error.code is ErrorCode.FORBIDDEN  # honest about itself, still not its own
        # The commands queue is FIFO: had the forged one been enqueued, it would have been
        # answered before this one.
        assert rt.server.handled + rt.server.rejected == answered + 1
        assert await max_position(rt) == before
