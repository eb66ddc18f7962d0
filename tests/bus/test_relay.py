"""The outbox relay on RabbitMQ: every stored event is published once, in store order,
as the documented AMQP message; its position is tracked in the store, survives a
restart, and a failed publish is retried rather than skipped."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from contracts import (
    HEADERS,
    SCHEMA_VERSION,
    Codec,
    CreateWorkflowSession,
    ErrorCode,
    EventEnvelope,
    RecordActivity,
    SessionStatus,
    StandardError,
    new_id,
)
from contracts.topology import QueueSpec
from coordinator.domain.identity import IdentityMap
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.relay import relay_checkpoint
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from module_sdk.testing import wait_for
from tests.bus.conftest import Bus
from tests.bus.support import Observer
from tests.support.tcp_proxy import TcpProxy
from transport.amqp import AmqpTransport
from transport.port import ConfirmTimeout, OutgoingMessage

pytestmark = pytest.mark.broker

S = SessionStatus


async def drive(client: CoordinatorClient, sessions: int = 3) -> list[uuid.UUID]:
    """A varied history: registrations, sessions created with and without a
    correlation id, links, status changes, activity, errors and one destroyed."""
    await client.register_module("executor", required=True)
    await client.register_module("task-loop", required=False)
    ids = []
    for i in range(sessions):
        sid = new_id()
        correlation = new_id() if i % 2 == 0 else None
        await client.call(
            CreateWorkflowSession(steps=["s"], session_id=sid), correlation_id=correlation
        )
        await client.link_module_session(sid, "executor", new_id())
        await client.call(
            RecordActivity(session_id=sid, module_id="executor"), correlation_id=new_id()
        )
        await client.update_session_status(sid, S.PAUSED)
        await client.update_session_status(sid, S.ACTIVE)
        error = StandardError(code=ErrorCode.MODULE_ERROR, message="flaky", module_id="executor")
        await client.report_error(sid, error, module_id="executor", fatal=False)
        ids.append(sid)
    await client.destroy_workflow_session(ids[0])
    await client.unlink_module_session(ids[0], "executor")
    return ids


async def stored_events(runtime: CoordinatorRuntime | SessionCoordinator) -> list[EventEnvelope]:
    coordinator = runtime.coordinator if isinstance(runtime, CoordinatorRuntime) else runtime
    store = coordinator.store
    assert store is not None
    return await asyncio.to_thread(store.read, 0, 100_000)


def assert_is_event_message(msg: AbstractIncomingMessage, env: EventEnvelope) -> None:
    """The AMQP message the relay must make of one stored event."""
    assert msg.message_id == str(env.event_id)
    assert msg.routing_key == env.type
    assert msg.type == env.type
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.content_type == "application/json"
    assert msg.timestamp is not None
    assert abs(msg.timestamp - env.occurred_at) < timedelta(seconds=1)
    headers = msg.headers
    assert headers[HEADERS.SCHEMA_VERSION] == SCHEMA_VERSION
    assert headers[HEADERS.SESSION_ID] == str(env.session_id)
    assert headers[HEADERS.VERSION] == env.version
    assert headers[HEADERS.POSITION] == env.position
    if env.correlation_id is not None:
        assert msg.correlation_id == str(env.correlation_id)
        assert headers[HEADERS.TRACEPARENT] == (
            f"00-{env.correlation_id.hex}-{env.event_id.hex[:16]}-01"
        )
    else:
        assert msg.correlation_id is None
        assert HEADERS.TRACEPARENT not in headers
    assert Codec("json").decode_envelope(msg.body) == env


async def test_every_stored_event_is_published_once_in_store_order_as_documented(
    amqp_bus: Bus, amqp_connection: AbstractConnection, tmp_path: object
) -> None:
    store = f"sqlite:///{tmp_path}/store.sqlite"
    topo = amqp_bus.topology
    async with amqp_bus.runtime(store=store) as rt:
        observer = await Observer.bind(
            amqp_connection, topo.events_exchange, f"{amqp_bus.prefix}.observer"
        )
        await drive(await amqp_bus.client())
        await rt.wait_published()
        published = await observer.drain()
        stored = await stored_events(rt)
        assert rt.coordinator.store is not None
        checkpoint = await asyncio.to_thread(
            rt.coordinator.store.checkpoints.get, relay_checkpoint(topo)
        )

    assert len(stored) > 20
    assert [m.message_id for m in published] == [str(e.event_id) for e in stored]
    for msg, env in zip(published, stored, strict=True):
        assert_is_event_message(msg, env)
    assert any(e.correlation_id is not None for e in stored)
    assert any(e.correlation_id is None for e in stored)
    assert checkpoint is not None
    assert checkpoint[0] == stored[-1].position
    assert rt.relay is not None
    assert rt.relay.position == stored[-1].position
    # What this process committed went out from memory, and is exactly the log's.
    assert rt.relay.from_memory > 0


async def test_restarted_relay_publishes_only_what_it_had_not_confirmed(
    amqp_bus: Bus, amqp_connection: AbstractConnection, tmp_path: object
) -> None:
    store = f"sqlite:///{tmp_path}/store.sqlite"
    topo = amqp_bus.topology
    async with amqp_bus.runtime(store=store) as rt:
        observer = await Observer.bind(
            amqp_connection, topo.events_exchange, f"{amqp_bus.prefix}.observer"
        )
        await drive(await amqp_bus.client())
        await rt.wait_published()
    before_restart = await observer.drain()

    # Committed while no relay runs: the coordinator alone, on the same store.
    async with SessionCoordinator(store) as coordinator:
        for _ in range(3):
            session = await coordinator.create_workflow_session(["offline"])
            await coordinator.link_module_session(session.session_id, "executor", new_id())
        everything = await stored_events(coordinator)

    async with amqp_bus.runtime(store=store) as rt2:
        await rt2.wait_published()
        after_restart = await observer.drain()
        assert rt2.coordinator.store is not None
        checkpoint = await asyncio.to_thread(
            rt2.coordinator.store.checkpoints.get, relay_checkpoint(topo)
        )

    ids = [str(e.event_id) for e in everything]
    first = len(before_restart)
    assert [m.message_id for m in before_restart] == ids[:first]
    assert first < len(ids)
    assert [m.message_id for m in after_restart] == ids[first:]
    for msg, env in zip(after_restart, everything[first:], strict=True):
        assert_is_event_message(msg, env)
    assert checkpoint is not None
    assert checkpoint[0] == everything[-1].position


async def test_failed_publishes_are_retried_not_skipped(
    amqp_bus: Bus,
    amqp_connection: AbstractConnection,
    tmp_path: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The events exchange is deleted under a running relay: publishing fails (no
    exchange, then no queue bound) while commands keep being committed; once the
    exchange and the binding are back, every event arrives, in store order."""
    caplog.set_level(logging.WARNING, logger="sessionbus.coordinator.relay")
    store = f"sqlite:///{tmp_path}/store.sqlite"
    topo = amqp_bus.topology
    async with amqp_bus.runtime(store=store) as rt:
        assert rt.relay is not None
        observer = await Observer.bind(
            amqp_connection, topo.events_exchange, f"{amqp_bus.prefix}.observer"
        )
        client = await amqp_bus.client()
        await drive(client, sessions=2)
        await rt.wait_published()
        before = await observer.drain()
        published_before = rt.relay.position

        channel = await amqp_connection.channel()
        await channel.exchange_delete(topo.events_exchange)
        for _ in range(5):
            await client.create_workflow_session(["while the exchange is gone"])
        await wait_for(
            lambda: any("relay publish failed" in r.getMessage() for r in caplog.records),
            timeout=10,
            what="the relay to fail publishing",
        )
        assert rt.relay.position == published_before
        stored_while_down = await stored_events(rt)
        assert stored_while_down[-1].position is not None
        assert stored_while_down[-1].position > published_before

        # Back, but without the alternate exchange: until the observer is bound again
        # every publish comes back unroutable, and must be retried too.
        exchange = await channel.declare_exchange(
            topo.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await observer.queue.bind(exchange, "#")
        await client.create_workflow_session(["after the exchange is back"])
        await rt.wait_published(timeout=30)
        after = await observer.drain()
        stored = await stored_events(rt)

    assert [m.message_id for m in before] == [
        str(e.event_id) for e in stored if (e.position or 0) <= published_before
    ]
    expected = [str(e.event_id) for e in stored if (e.position or 0) > published_before]
    first_seen = list(dict.fromkeys(m.message_id for m in after))
    assert first_seen == expected
    by_id = {str(e.event_id): e for e in stored}
    for msg in after:
        assert msg.message_id is not None
        assert_is_event_message(msg, by_id[msg.message_id])


async def test_a_publish_never_confirmed_fails_in_bounded_time_with_a_retryable_error(
    amqp_url: str, prefix: str
) -> None:
    """Through a connection gone silent (a partition: no reset, no confirm ever), a
    confirmed publish raises ``ConfirmTimeout`` after ``confirm_timeout`` instead of
    waiting for the connection's heartbeat, and says it may be retried."""
    async with TcpProxy.for_url(amqp_url) as proxy:
        transport = AmqpTransport(
            proxy.url_for(amqp_url), connection_name=f"{prefix} silent", confirm_timeout=0.5
        )
        await transport.connect()
        try:
            queue = f"{prefix}.confirms"
            await transport.declare_queue(QueueSpec(queue, auto_delete=True))
            message = OutgoingMessage(body=b"{}", content_type="application/json")
            await transport.publish("", queue, message)
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(ConfirmTimeout) as raised:
                await asyncio.wait_for(transport.publish("", queue, message), 10)
            assert time.monotonic() - started < 5
            assert raised.value.retryable
            with pytest.raises(ConfirmTimeout):
                await asyncio.wait_for(transport.publish_many("", [(queue, message)] * 3), 10)
        finally:
            proxy.cut()
            await transport.close()


async def test_the_relay_publishes_again_what_a_silent_connection_never_confirmed(
    amqp_bus: Bus, amqp_connection: AbstractConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator's connection goes silent while the relay publishes: the
    publish fails with ``ConfirmTimeout`` within its bound, the relay's position stays,
    and once the connection is reset and restored the relay publishes the events."""
    caplog.set_level(logging.WARNING, logger="sessionbus.coordinator.relay")
    topo = amqp_bus.topology
    assert amqp_bus.url is not None
    async with TcpProxy.for_url(amqp_bus.url) as proxy:
        transport = AmqpTransport(
            proxy.url_for(amqp_bus.url),
            connection_name=amqp_bus.connection_name("coordinator via proxy"),
            confirm_timeout=0.5,
        )
        runtime = CoordinatorRuntime(
            transport, topology=topo, identity=IdentityMap.parse("guest=*")
        )
        async with runtime as rt:
            assert rt.relay is not None
            observer = await Observer.bind(
                amqp_connection, topo.events_exchange, f"{amqp_bus.prefix}.observer"
            )
            await rt.coordinator.create_workflow_session(["before"])
            await rt.wait_published()
            published = rt.relay.position
            proxy.blackhole()
            sid = (await rt.coordinator.create_workflow_session(["while silent"])).session_id
            await wait_for(
                lambda: any("not confirmed within" in r.getMessage() for r in caplog.records),
                timeout=10,
                what="the relay's publish to time out",
            )
            assert rt.relay.position == published
            proxy.cut()  # the partition ends as a reset: aio-pika reconnects
            await rt.wait_published(timeout=30)
            received = {m.message_id for m in await observer.drain()}
            stored = {str(e.event_id) for e in await stored_events(rt) if e.session_id == sid}
    assert stored
    assert stored <= received
