"""Several broker addresses: a transport given the nodes of a cluster connects to the
first that answers and, when its node goes, moves to the next one with everything on
its connection (consumers, the publishing channel, direct reply-to).

Two TCP proxies in front of the one test broker stand for two nodes (the queues behind
them are the same, as a cluster's quorum queues are from every node); making one proxy
reset and refuse every connection is that node going away. The three-node cluster
runs of the fault suite (tests/faults/test_cluster.py) do the same against real nodes.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import pytest

from contracts import SessionStatus
from module_sdk.testing import wait_for
from tests.bus.conftest import Bus
from tests.bus.support import RecordingModule, wait_status
from tests.bus.test_reconnect import create_many, finish
from tests.support.tcp_proxy import TcpProxy
from transport.amqp import AmqpTransport
from transport.port import TransportError

pytestmark = pytest.mark.broker

S = SessionStatus


def _port(address: str | None) -> int | None:
    return urllib.parse.urlsplit(address or "").port


@pytest.fixture
async def nodes(amqp_url: str) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    """Two proxies to the test broker: two addresses of one "cluster"."""
    async with TcpProxy.for_url(amqp_url) as first, TcpProxy.for_url(amqp_url) as second:
        yield first, second


async def test_connect_skips_an_address_that_does_not_answer(
    amqp_url: str, nodes: tuple[TcpProxy, TcpProxy]
) -> None:
    down, up = nodes
    down.refuse_for(60)
    transport = AmqpTransport(
        f"{down.url_for(amqp_url)},{up.url_for(amqp_url)}", connection_name="failover skip"
    )
    await transport.connect()
    try:
        assert _port(transport.address) == up.port
        assert down.stats.refused == 1
        assert len(up.links) == 1
    finally:
        await transport.close()


async def test_no_address_answering_is_one_error_naming_each(
    amqp_url: str, nodes: tuple[TcpProxy, TcpProxy]
) -> None:
    for proxy in nodes:
        proxy.refuse_for(60)
    transport = AmqpTransport(
        [proxy.url_for(amqp_url) for proxy in nodes], connection_name="failover none"
    )
    with pytest.raises(TransportError, match="cannot reach RabbitMQ") as caught:
        await transport.connect()
    for proxy in nodes:
        assert f":{proxy.port}/" in str(caught.value)
    assert "guest@" not in str(caught.value)  # passwords hidden


async def test_coordinator_module_and_client_move_to_the_next_node_when_theirs_goes(
    amqp_url: str,
    prefix: str,
    nodes: tuple[TcpProxy, TcpProxy],
    request: pytest.FixtureRequest,
) -> None:
    """The first node goes for good in the middle of a run: every party reconnects to
    the second, the module's consumer comes back there, and every event is applied
    once, in order."""
    first, second = nodes
    addresses = f"{first.url_for(amqp_url)},{second.url_for(amqp_url)}"
    bus = Bus("amqp", prefix, request.node.nodeid[-120:], url=addresses)
    try:
        async with bus.runtime() as rt:
            module = bus.module(RecordingModule, client_timeout=3)
            async with module:
                client = await bus.client(timeout=3)
                parties = [
                    t
                    for t in (rt.transport, module.transport, client.transport)
                    if isinstance(t, AmqpTransport)
                ]
                assert len(parties) == 3
                assert {_port(t.address) for t in parties} == {first.port}
                sids: list[uuid.UUID] = []
                driver = asyncio.create_task(create_many(client, 40, sids))
                await wait_for(lambda: len(module.created) >= 10, timeout=20, what="10 links")

                first.outage(600)  # gone for the rest of the test
                assert not driver.done(), "the node went after the run, not in the middle"
                await driver
                for sid in sids:
                    await wait_status(rt, sid, S.ACTIVE, timeout=30)
                assert len(module.created) == 40
                assert {_port(t.address) for t in parties} == {second.port}
                assert first.links == set()
                assert first.stats.cut >= len(parties)

                await finish(rt, client, module, sids)
    finally:
        await bus.aclose()
