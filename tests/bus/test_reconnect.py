"""Lost connections on RabbitMQ: the broker force-closes a module's or the
coordinator's connection (by its name, through the management API, as an operator or
a network fault would) in the middle of a run. aio-pika's robust connection comes back,
the consumers with it, and nothing is lost or applied twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from contracts import REGISTRY_ID, SessionStatus
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from module_sdk.testing import wait_for
from tests.bus.conftest import BrokerUsers, Bus
from tests.bus.support import RecordingModule, wait_destroyed, wait_status
from tests.support.broker_admin import close_user_connections, user_connections
from transport.amqp import AmqpTransport

pytestmark = pytest.mark.broker

S = SessionStatus


def reconnect_counter(transport: object) -> list[object]:
    """A list that grows each time the transport's robust connection is restored."""
    assert isinstance(transport, AmqpTransport)
    restored: list[object] = []
    transport.connection.reconnect_callbacks.add(lambda *args: restored.append(args))
    return restored


async def force_close(user: str) -> str:
    """Close the one connection of ``user`` as the broker would on a network fault."""
    (name,) = await asyncio.to_thread(
        close_user_connections, user, reason=f"sessionbus test: connection of {user} lost"
    )
    return name


async def reconnected(restored: list[object], user: str, old: str) -> None:
    await wait_for(lambda: bool(restored), timeout=20, what=f"{user} to reconnect")
    (name,) = await asyncio.to_thread(user_connections, user)
    assert name != old  # a new connection (another client port), not the old one


async def create_many(client: CoordinatorClient, count: int, into: list[uuid.UUID]) -> None:
    for i in range(count):  # one at a time: the test watches ``into`` grow
        session = await client.create_workflow_session([f"step{i}"])
        into.append(session.session_id)


async def finish(
    rt: CoordinatorRuntime,
    client: CoordinatorClient,
    module: RecordingModule,
    sids: list[uuid.UUID],
) -> None:
    """Destroy every session, then check the module applied each one's events exactly
    once, in version order, and that every module session it made was destroyed
    exactly once. (A hook may run twice: when a link's reply is lost with the
    connection, the redelivered event makes a second module session, the coordinator
    refuses to link it, and the SDK destroys it. What must never happen is a module
    session left behind, or an event applied twice.)"""
    for sid in sids:
        await client.destroy_workflow_session(sid)
    for sid in sids:
        await wait_destroyed(rt, sid, timeout=30)
    await rt.wait_published()
    store = rt.coordinator.store
    assert store is not None
    events = [e for e in await asyncio.to_thread(store.read, 0, 100_000) if e.session_id in sids]
    final = {sid: max(e.version for e in events if e.session_id == sid) for sid in sids}
    stats = module.consumer.stats

    def behind() -> dict[uuid.UUID, tuple[list[int], int]]:
        return {
            s: (stats.versions.get(s, []), final[s])
            for s in sids
            if len(stats.versions.get(s, ())) != final[s]
        }

    try:
        await wait_for(lambda: not behind(), timeout=20, what="the module to apply every event")
    except TimeoutError as exc:
        raise AssertionError(f"applied versions / final version: {behind()}") from exc
    for sid in sids:
        assert stats.versions[sid] == list(range(1, final[sid] + 1))
    assert {d.linked_workflow_session_id for d in module.destroyed} == set(sids)
    assert sorted(d.session_id for d in module.destroyed) == sorted(module.made)
    assert REGISTRY_ID not in stats.versions


async def test_module_consumer_comes_back_after_its_connection_is_closed_mid_run(
    amqp_bus: Bus, broker_users: BrokerUsers
) -> None:
    executor = broker_users("executor")
    async with amqp_bus.runtime(identity=f"{executor['user']}=executor;guest=*") as rt:
        module = amqp_bus.module(RecordingModule, client_timeout=3, credentials=executor)
        async with module:
            restored = reconnect_counter(module.transport)
            client = await amqp_bus.client()
            sids: list[uuid.UUID] = []
            driver = asyncio.create_task(create_many(client, 40, sids))
            await wait_for(lambda: len(module.created) >= 10, timeout=20, what="10 links")

            old = await force_close(executor["user"])
            assert not driver.done(), "the fault came after the run, not in the middle of it"
            await reconnected(restored, executor["user"], old)
            await driver
            for sid in sids:
                await wait_status(rt, sid, S.ACTIVE, timeout=30)
            assert len(module.created) == 40

            await finish(rt, client, module, sids)


async def test_coordinator_serves_and_publishes_again_after_its_connection_is_closed(
    amqp_bus: Bus, broker_users: BrokerUsers
) -> None:
    coordinator = broker_users("coordinator")
    async with amqp_bus.runtime(credentials=coordinator) as rt:
        module = amqp_bus.module(RecordingModule, client_timeout=3)
        async with module:
            restored = reconnect_counter(rt.transport)
            client = await amqp_bus.client(timeout=3)
            sids: list[uuid.UUID] = []
            driver = asyncio.create_task(create_many(client, 40, sids))
            await wait_for(lambda: len(module.created) >= 10, timeout=20, what="10 links")

            old = await force_close(coordinator["user"])
            assert not driver.done(), "the fault came after the run, not in the middle of it"
            await reconnected(restored, coordinator["user"], old)
            await driver
            for sid in sids:
                await wait_status(rt, sid, S.ACTIVE, timeout=30)

            await finish(rt, client, module, sids)
            # Heartbeats reach the coordinator again as well.
            received = rt.heartbeats.received
            await wait_for(
                lambda: rt.heartbeats.received > received,
                timeout=10,
                what="a heartbeat after the reconnect",
            )
