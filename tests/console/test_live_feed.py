"""The console's live feed across a lost broker connection, over HTTP against a real
coordinator, modules and broker: the console's own connection goes through a TCP proxy
that cuts it; once the connection is restored, an open page's stream says events may
have been missed (``resync``) and carries the events published after. And the feed's
use of the transport's ``on_reconnect`` hook, on the in-process broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from contracts import GENESIS_HASH, ActivityRecorded, Codec, EventEnvelope, Topology, seal
from coordinator.service.relay import event_message
from sessionctl.console import ConsoleServer, ConsoleSettings
from sessionctl.console.feed import LiveFeed
from tests.console.conftest import ConsoleSystem, csrf_of, sse_events
from tests.support.tcp_proxy import TcpProxy
from transport.memory import MemoryBroker


async def _next_of(stream: AsyncIterator[tuple[str, str]], wanted: str) -> str:
    """The data of the stream's next ``wanted`` event (others are passed over)."""
    async for kind, data in stream:
        if kind == wanted:
            return data
    raise AssertionError(f"the stream ended before a {wanted!r} event")


@pytest.mark.broker
async def test_after_a_lost_broker_connection_pages_are_told_to_resync_and_live_updates_go_on(
    console: ConsoleSystem,
) -> None:
    """The console's exclusive queue goes with its lost connection: after the restore
    the console has declared and consumed it again, an open stream gets ``resync``
    (what was published meanwhile is not in it), then a session created afterwards."""
    async with TcpProxy.for_url(console.url) as proxy:
        settings = ConsoleSettings(
            amqp_url=console.url, topology=console.topology, feed_url=proxy.url_for(console.url)
        )
        async with ConsoleServer(settings) as server:
            http = console.http()
            http.base_url = server.url  # type: ignore[assignment]
            form = await http.get("/login")
            answer = await http.post(
                "/login", data={"user": "guest", "password": "guest", "csrf": csrf_of(form.text)}
            )
            assert answer.status_code == 303
            async with http.stream("GET", "/sessions/feed") as response:
                assert response.status_code == 200
                stream = sse_events(response)
                ready = json.loads(await asyncio.wait_for(_next_of(stream, "ready"), 10))

                assert proxy.outage(1.0) >= 1, "the console's feed connection was not proxied"
                resync = json.loads(await asyncio.wait_for(_next_of(stream, "resync"), 60))
                assert resync["queue"] == ready["queue"]
                assert resync["reconnects"] >= 1

                session = await console.client.create_workflow_session(["after the cut"])

                async def first_of_session() -> dict[str, object]:
                    while True:
                        item = json.loads(await _next_of(stream, "session"))
                        if item["session_id"] == str(session.session_id):
                            return dict(item)

                item = await asyncio.wait_for(first_of_session(), 30)
    assert item["type"] == "session.created"
    assert item["version"] == 1


async def test_every_open_page_is_told_to_resync_on_each_restore_until_the_feed_closes() -> None:
    """Each stream gets one ``resync`` per restored connection; a closed feed unhooks."""
    topology = Topology("feedresync")
    transport = MemoryBroker().transport()
    await transport.connect()
    for spec in topology.exchange_specs():
        await transport.declare_exchange(spec)
    feed = LiveFeed(transport, topology, own_transport=False)
    await feed.start()
    assert feed.running, feed.problem
    async with feed.subscribe() as first, feed.subscribe() as second:
        await transport.reconnected()
        for subscriber in (first, second):
            kind, data = subscriber.queue.get_nowait()
            assert (kind, data) == ("resync", {"queue": feed.queue_name, "reconnects": 1})
    await feed.close()
    await transport.reconnected()  # the closed feed is no longer hooked
    assert feed.resyncs == 1
    await transport.close()


async def test_the_feed_follows_the_events_only_while_some_page_watches() -> None:
    """Nobody watching for ``idle_seconds``: the queue is gone and the broker routes
    nothing to it; the next page's stream brings it back and gets what is published."""
    topology = Topology("feedidle")
    broker = MemoryBroker()
    transport = broker.transport()
    await transport.connect()
    for spec in topology.exchange_specs():
        await transport.declare_exchange(spec)
    feed = LiveFeed(transport, topology, own_transport=False, idle_seconds=0.05)
    await feed.start()
    assert feed.running, feed.problem
    assert feed.following  # started: the broker's permissions were checked
    await asyncio.sleep(0.2)
    assert not feed.following
    assert feed.queue_name not in broker.queues
    async with feed.subscribe() as page:
        assert feed.following
        assert feed.queue_name in broker.queues
        env = seal(
            EventEnvelope(
                event_id=uuid.uuid4(),
                session_id=uuid.uuid4(),
                version=1,
                occurred_at=datetime.now(UTC),
                actor="test",
                prev_hash=GENESIS_HASH,
                hash=GENESIS_HASH,
                event=ActivityRecorded(),
            )
        )
        await transport.publish(
            topology.events_exchange,
            Topology.routing_key(env.type),
            event_message(env, Codec("json")),
        )
        kind, item = await asyncio.wait_for(page.queue.get(), 5)
        assert (kind, item["session_id"]) == ("session", str(env.session_id))
        await asyncio.sleep(0.2)
        assert feed.following  # a page is open: no idling
    await asyncio.sleep(0.2)
    assert not feed.following
    await feed.close()
    await transport.close()
