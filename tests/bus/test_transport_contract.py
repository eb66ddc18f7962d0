"""The broker port's contract, proven once per broker: the same test class runs on the
in-process broker (``transport.memory``) and on RabbitMQ (``transport.amqp``), so the
module authors' test harness keeps the rules the real broker enforces."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from contracts import HEADERS
from contracts.topology import ExchangeSpec, QueueSpec
from module_sdk.testing import wait_for
from tests.bus.conftest import Bus
from tests.bus.support import Inbox, dead_letters, drain, take
from transport.port import (
    DIRECT_REPLY_TO,
    AccessRefused,
    Delivery,
    OutgoingMessage,
    QueueStats,
    TransportClosed,
    TransportError,
    Unroutable,
)
from transport.topology import dead_letter, declare_topology


def message(body: bytes | str, **fields: object) -> OutgoingMessage:
    data = body.encode() if isinstance(body, str) else body
    return OutgoingMessage(body=data, content_type="text/plain", **fields)  # type: ignore[arg-type]


def death(delivery: Delivery) -> dict[str, object]:
    """The newest ``x-death`` entry the broker put on a dead letter."""
    deaths = delivery.headers.get("x-death")
    assert isinstance(deaths, list), f"no x-death header in {delivery.headers}"
    assert deaths
    entry = deaths[0]
    assert isinstance(entry, dict)
    return entry


async def with_dead_letters(bus: Bus, name: str = "dlx") -> tuple[str, str]:
    """A fanout dead-letter exchange and the queue behind it."""
    t = await bus.connect("setup")
    exchange, queue = f"{bus.prefix}.{name}", f"{bus.prefix}.{name}.q"
    await t.declare_exchange(ExchangeSpec(exchange, "fanout"))
    await t.declare_queue(QueueSpec(queue, bindings=[(exchange, "")]))
    return exchange, queue


class TestTransportContract:
    """Routing, settlement, dead-lettering, consumers, streams, request/reply and
    identity, identical on both transports."""

    async def test_topic_routing_star_is_one_word_and_hash_zero_or_more(self, bus: Bus) -> None:
        t = await bus.connect("test")
        p = bus.prefix
        await t.declare_exchange(ExchangeSpec(f"{p}.topic", "topic"))
        patterns = {
            "star": "session.*",
            "hash": "session.#",
            "all": "#",
            "middle": "*.status.#",
            "exact": "module.registered",
        }
        for name, pattern in patterns.items():
            await t.declare_queue(QueueSpec(f"{p}.{name}", bindings=[(f"{p}.topic", pattern)]))
        keys = [
            "session",
            "session.created",
            "session.status.changed",
            "module.status",
            "module.registered",
        ]
        for key in keys:
            await t.publish(f"{p}.topic", key, message(key))

        got = {}
        for name in patterns:
            deliveries = await drain(t, f"{p}.{name}")
            assert all(d.body == d.routing_key.encode() for d in deliveries)
            assert all(d.exchange == f"{p}.topic" for d in deliveries)
            got[name] = [d.routing_key for d in deliveries]
        assert got == {
            "star": ["session.created"],
            "hash": ["session", "session.created", "session.status.changed"],
            "all": keys,
            "middle": ["session.status.changed", "module.status"],
            "exact": ["module.registered"],
        }

    async def test_alternate_exchange_catches_events_no_queue_is_bound_for(self, bus: Bus) -> None:
        t = await bus.connect("test")
        topo = bus.topology
        for spec in topo.exchange_specs():
            await t.declare_exchange(spec)
        (unroutable,) = [q for q in topo.queue_specs() if q.name == topo.unroutable_queue]
        await t.declare_queue(unroutable)
        linked_only = f"{bus.prefix}.linked-only"
        await t.declare_queue(
            QueueSpec(linked_only, bindings=[(topo.events_exchange, "session.linked")])
        )

        # Mandatory, yet not refused: the alternate exchange took it.
        await t.publish(topo.events_exchange, "session.created", message("nobody wants me"))
        await t.publish(topo.events_exchange, "session.linked", message("wanted"))

        (caught,) = await take(t, topo.unroutable_queue, 1)
        assert (caught.routing_key, caught.body) == ("session.created", b"nobody wants me")
        assert [d.body for d in await drain(t, linked_only)] == [b"wanted"]
        assert await drain(t, topo.unroutable_queue) == []

    async def test_mandatory_publish_that_matches_no_queue_raises_unroutable(
        self, bus: Bus
    ) -> None:
        t = await bus.connect("test")
        plain = f"{bus.prefix}.plain"
        await t.declare_exchange(ExchangeSpec(plain, "topic"))
        with pytest.raises(Unroutable):
            await t.publish(plain, "nobody.listens", message("lost?"))
        # Not mandatory: dropped without an error.
        await t.publish(plain, "nobody.listens", message("dropped"), mandatory=False)

        # The transport keeps working after the refusal.
        queue = f"{bus.prefix}.somebody"
        await t.declare_queue(QueueSpec(queue, bindings=[(plain, "somebody.#")]))
        await t.publish(plain, "somebody.listens", message("kept"))
        assert [d.body for d in await drain(t, queue)] == [b"kept"]

    async def test_a_batch_arrives_in_order_and_an_unroutable_one_fails_only_itself(
        self, bus: Bus
    ) -> None:
        """``publish_many`` sends every message of a batch, in order; one that matches
        no queue makes the call raise ``Unroutable`` but the others are delivered; and
        batches and single publishes running at once are all confirmed (the confirms
        stay matched to their messages)."""
        t = await bus.connect("test")
        plain = f"{bus.prefix}.batches"
        queue = f"{bus.prefix}.batched"
        await t.declare_exchange(ExchangeSpec(plain, "topic"))
        await t.declare_queue(QueueSpec(queue, bindings=[(plain, "kept.#")]))
        batch = [(f"kept.{i}", message(f"m{i}", message_id=f"id-{i}")) for i in range(300)]
        await t.publish_many(plain, batch)
        got = await take(t, queue, 300)
        assert [d.body for d in got] == [f"m{i}".encode() for i in range(300)]
        assert [d.message_id for d in got] == [f"id-{i}" for i in range(300)]

        mixed = [("kept.a", message("a")), ("nobody.b", message("b")), ("kept.c", message("c"))]
        with pytest.raises(Unroutable):
            await t.publish_many(plain, mixed)
        assert [d.body for d in await take(t, queue, 2)] == [b"a", b"c"]

        async def single(i: int) -> None:
            await t.publish(plain, f"kept.s{i}", message(f"s{i}"))

        async def many(i: int) -> None:
            await t.publish_many(
                plain, [(f"kept.b{i}.{j}", message(f"b{i}.{j}")) for j in range(50)]
            )

        await asyncio.wait_for(
            asyncio.gather(*(single(i) if i % 2 else many(i) for i in range(20))), 30
        )
        bodies = {d.body for d in await take(t, queue, 10 + 10 * 50)}
        assert len(bodies) == 10 + 10 * 50
        assert await drain(t, queue) == []

    async def test_ack_removes_requeue_redelivers_reject_dead_letters(self, bus: Bus) -> None:
        dlx, dlq = await with_dead_letters(bus)
        t = await bus.connect("test")
        work = f"{bus.prefix}.work"
        await t.declare_queue(QueueSpec(work, arguments={"x-dead-letter-exchange": dlx}))

        async def settle(delivery: Delivery) -> None:
            if delivery.body == b"requeue" and not delivery.redelivered:
                await delivery.requeue()
            elif delivery.body == b"reject":
                await delivery.reject()
            else:
                await delivery.ack()

        inbox = Inbox(settle)
        await t.consume(work, inbox, prefetch=10)
        for body in ("ack", "requeue", "reject"):
            await t.publish("", work, message(body))
        await inbox.wait(4)

        assert sorted((d.body, d.redelivered) for d in inbox.deliveries) == [
            (b"ack", False),
            (b"reject", False),
            (b"requeue", False),
            (b"requeue", True),
        ]
        assert all(d.settled for d in inbox.deliveries)
        with pytest.raises(TransportError):
            await inbox.deliveries[0].ack()  # settled exactly once

        (dead,) = await take(t, dlq, 1)
        assert dead.body == b"reject"
        assert death(dead)["reason"] == "rejected"
        assert death(dead)["queue"] == work
        stats = await t.queue_stats(work)
        assert stats is not None
        assert stats.messages == 0
        assert await drain(t, dlq) == []

    async def test_settling_out_of_order_acks_exactly_what_was_acked(self, bus: Bus) -> None:
        """Handlers finish in any order; some requeue or reject while later ones are
        acked (RabbitMQ's consumer acks travel together: no ack may cover a delivery
        that is still being handled or is requeued)."""
        dlx, dlq = await with_dead_letters(bus)
        t = await bus.connect("test")
        work = f"{bus.prefix}.work"
        await t.declare_queue(QueueSpec(work, arguments={"x-dead-letter-exchange": dlx}))
        count = 60
        seen: list[tuple[int, bool]] = []

        async def settle(delivery: Delivery) -> None:
            n = int(delivery.body)
            seen.append((n, delivery.redelivered))
            await asyncio.sleep((n * 7 % 11) / 1000)  # finish out of arrival order
            if n % 10 == 3 and not delivery.redelivered:
                await delivery.requeue()
            elif n % 10 == 7:
                await delivery.reject()
            else:
                await delivery.ack()

        handle = await t.consume(work, settle, prefetch=32)
        for n in range(count):
            await t.publish("", work, message(str(n)))
        expected = count + count // 10  # every "3" comes twice
        await wait_for(lambda: len(seen) >= expected, what=f"{expected} deliveries")
        await asyncio.sleep(0.2)  # anything wrongly requeued would be back by now
        await handle.close()

        assert len(seen) == expected
        assert sorted(n for n, again in seen if again) == [n for n in range(count) if n % 10 == 3]
        stats = await t.queue_stats(work)
        assert stats is not None
        assert stats.messages == 0
        dead = await take(t, dlq, count // 10)
        assert sorted(int(d.body) for d in dead) == [n for n in range(count) if n % 10 == 7]

    async def test_delivery_limit_exceeded_dead_letters_the_message(self, bus: Bus) -> None:
        dlx, dlq = await with_dead_letters(bus)
        t = await bus.connect("test")
        work = f"{bus.prefix}.limited"
        await t.declare_queue(
            QueueSpec(
                work,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": 2,
                    "x-dead-letter-exchange": dlx,
                },
            )
        )

        async def always_requeue(delivery: Delivery) -> None:
            await delivery.requeue()

        inbox = Inbox(always_requeue)
        await t.consume(work, inbox, prefetch=1)
        await t.publish("", work, message("poison", message_id="poison-1"))

        (dead,) = await take(t, dlq, 1)
        # Delivered once, then redelivered up to the limit; the next return dead-letters it.
        assert [d.redelivered for d in inbox.deliveries] == [False, True, True]
        assert (dead.body, dead.message_id) == (b"poison", "poison-1")
        assert death(dead)["reason"] == "delivery_limit"
        assert death(dead)["queue"] == work
        stats = await t.queue_stats(work)
        assert stats is not None
        assert stats.messages == 0

    async def test_single_active_consumer_second_gets_nothing_until_first_cancels(
        self, bus: Bus
    ) -> None:
        t = await bus.connect("test")
        queue = f"{bus.prefix}.sac"
        await t.declare_queue(
            QueueSpec(queue, arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
        )
        first, second = await bus.connect("replica-1"), await bus.connect("replica-2")
        inbox1, inbox2 = Inbox(), Inbox()
        handle1 = await first.consume(queue, inbox1, prefetch=10)
        await second.consume(queue, inbox2, prefetch=10)

        for i in range(5):
            await t.publish("", queue, message(f"a{i}"))
        await inbox1.wait(5)
        assert inbox1.bodies == [f"a{i}".encode() for i in range(5)]
        assert inbox2.deliveries == []

        await handle1.cancel()
        for i in range(5):
            await t.publish("", queue, message(f"b{i}"))
        await inbox2.wait(5)
        assert inbox2.bodies == [f"b{i}".encode() for i in range(5)]
        assert len(inbox1.deliveries) == 5

    async def test_get_is_refused_on_a_quorum_queue_with_single_active_consumer(
        self, bus: Bus
    ) -> None:
        """RabbitMQ does not support basic.get there (module and command queues are such
        queues): read them with a consumer."""
        t = await bus.connect("test")
        queue = f"{bus.prefix}.sac"
        await t.declare_queue(
            QueueSpec(queue, arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
        )
        await t.publish("", queue, message("only by consume"))
        with pytest.raises(TransportError, match="RESOURCE_LOCKED"):
            await t.get(queue)
        inbox = Inbox()
        await t.consume(queue, inbox)
        await inbox.wait(1)
        assert inbox.bodies == [b"only by consume"]

    async def test_stream_is_replayed_from_the_first_offset_by_every_reader(self, bus: Bus) -> None:
        t = await bus.connect("test")
        stream = f"{bus.prefix}.stream"
        await t.declare_queue(QueueSpec(stream, arguments={"x-queue-type": "stream"}))
        for i in range(5):
            await t.publish("", stream, message(f"e{i}"))

        readers = [Inbox(), Inbox()]
        for reader in readers:
            await t.consume(stream, reader, prefetch=10, arguments={"x-stream-offset": "first"})
        for reader in readers:
            await reader.wait(5)
            assert reader.bodies == [f"e{i}".encode() for i in range(5)]
            offsets = [d.headers["x-stream-offset"] for d in reader.deliveries]
            assert all(isinstance(o, int) for o in offsets)
            assert offsets == sorted(set(offsets))

        # A reader without an offset starts at the next message.
        latecomer = Inbox()
        await t.consume(stream, latecomer, prefetch=10)
        await t.publish("", stream, message("e5"))
        await latecomer.wait(1)
        assert latecomer.bodies == [b"e5"]

    async def test_stream_is_read_from_the_time_the_broker_took_each_message(
        self, bus: Bus
    ) -> None:
        """A timestamp offset is by when the broker stored each message, whatever the
        publisher put in the (optional) timestamp property."""
        t = await bus.connect("test")
        stream = f"{bus.prefix}.stream"
        await t.declare_queue(QueueSpec(stream, arguments={"x-queue-type": "stream"}))
        misleading = datetime.now(UTC) + timedelta(days=1)
        for i in range(3):
            await t.publish("", stream, message(f"before{i}", timestamp=misleading))
        # AMQP timestamps are whole seconds: mark the next one, and publish after it.
        mark = int(time.time()) + 1
        await wait_for(lambda: time.time() > mark + 0.05, timeout=3, what="the clock to pass")
        for i in range(3):
            await t.publish("", stream, message(f"after{i}"))

        reader = Inbox()
        since = datetime.fromtimestamp(mark, UTC)
        await t.consume(stream, reader, prefetch=10, arguments={"x-stream-offset": since})
        await reader.wait(3)
        assert reader.bodies == [f"after{i}".encode() for i in range(3)]

    async def test_request_reply_over_direct_reply_to_matches_correlation_ids(
        self, bus: Bus
    ) -> None:
        server, client = await bus.connect("responder"), await bus.connect("requester")
        rpc, silent = f"{bus.prefix}.rpc", f"{bus.prefix}.silent"
        await server.declare_queue(QueueSpec(rpc))
        await server.declare_queue(QueueSpec(silent))
        requests: list[Delivery] = []

        async def respond(delivery: Delivery) -> None:
            requests.append(delivery)
            if len(requests) < 2:
                return
            for request in reversed(requests):  # the second is answered first
                assert request.reply_to is not None
                await server.send(
                    request.reply_to,
                    message(b"re:" + request.body, correlation_id=request.correlation_id),
                )
                await request.ack()

        await server.consume(rpc, respond, prefetch=10)
        one, two = await asyncio.gather(
            client.request(rpc, message("one", correlation_id="c-1"), timeout=10),
            client.request(rpc, message("two", correlation_id="c-2"), timeout=10),
        )
        assert (one.body, one.correlation_id) == (b"re:one", "c-1")
        assert (two.body, two.correlation_id) == (b"re:two", "c-2")
        assert all((r.reply_to or "").startswith(DIRECT_REPLY_TO) for r in requests)

        with pytest.raises(TimeoutError):
            await client.request(silent, message("anyone?", correlation_id="c-3"), timeout=0.3)
        with pytest.raises(ValueError, match="correlation_id"):
            await client.request(rpc, message("no id"), timeout=1)

    async def test_forged_user_id_is_refused_and_the_transport_keeps_working(
        self, bus: Bus
    ) -> None:
        t = await bus.connect("forger")
        queue = f"{bus.prefix}.inbox"
        await t.declare_queue(QueueSpec(queue))
        with pytest.raises(AccessRefused):
            await t.publish("", queue, message("forged", user_id=f"not-{t.user}"))
        # At once, not after a pause: the very next publish goes through.
        await t.publish("", queue, message("honest", user_id=t.user))
        await t.publish("", queue, message("anonymous"))
        delivered = await drain(t, queue)
        assert [(d.body, d.user_id) for d in delivered] == [
            (b"honest", t.user),
            (b"anonymous", None),
        ]

    async def test_queue_stats_and_get(self, bus: Bus) -> None:
        t = await bus.connect("test")
        queue = f"{bus.prefix}.stats"
        assert await t.queue_stats(f"{bus.prefix}.missing") is None
        await t.declare_queue(QueueSpec(queue))
        assert await t.get(queue) is None
        for i in range(3):
            await t.publish("", queue, message(f"m{i}"))
        assert await t.queue_stats(queue) == QueueStats(queue, 3, 0)

        first = await t.get(queue)
        assert first is not None
        assert (first.body, first.redelivered, first.settled) == (b"m0", False, False)
        assert await t.queue_stats(queue) == QueueStats(queue, 2, 0)  # unacked is not ready
        await first.requeue()
        assert first.settled
        again = await t.get(queue)
        assert again is not None
        assert (again.body, again.redelivered) == (b"m0", True)
        await again.ack()
        assert [d.body for d in await drain(t, queue)] == [b"m1", b"m2"]
        assert await t.get(queue) is None

        handle = await t.consume(queue, Inbox())
        assert await t.queue_stats(queue) == QueueStats(queue, 0, 1)
        await handle.close()
        assert await t.queue_stats(queue) == QueueStats(queue, 0, 0)
        await t.delete_queue(queue)
        assert await t.queue_stats(queue) is None

    async def test_dead_letter_puts_reason_code_and_field_headers_on_the_message(
        self, bus: Bus
    ) -> None:
        t = await bus.connect("test")
        topo = bus.topology
        await declare_topology(t, topo)
        work = f"{bus.prefix}.work"
        await t.declare_queue(QueueSpec(work))
        await t.publish(
            "",
            work,
            OutgoingMessage(
                body=b'{"not": "an event"',
                content_type="application/json",
                headers={HEADERS.SESSION_ID: "abc"},
                message_id="m-1",
                correlation_id="c-1",
                user_id=t.user,
            ),
        )
        delivery = await t.get(work)
        assert delivery is not None
        await dead_letter(
            t,
            topo,
            delivery,
            reason="malformed json body " + "x" * 5000,
            code="INVALID_MESSAGE",
            rejected_by="tests",
            field="$.event",
        )
        assert delivery.settled

        (dead,) = await dead_letters(t, topo, 1)
        h = dead.headers
        assert str(h[HEADERS.REJECT_REASON]).startswith("malformed json body")
        assert len(str(h[HEADERS.REJECT_REASON])) == 1000
        assert h[HEADERS.REJECT_CODE] == "INVALID_MESSAGE"
        assert h[HEADERS.REJECT_FIELD] == "$.event"
        assert h[HEADERS.REJECTED_BY] == "tests"
        assert h["x-original-routing-key"] == work
        assert h["x-original-exchange"] == ""
        assert h[HEADERS.SESSION_ID] == "abc"
        assert (dead.body, dead.message_id, dead.correlation_id) == (
            b'{"not": "an event"',
            "m-1",
            "c-1",
        )
        assert dead.content_type == "application/json"
        assert await t.get(work) is None

    async def test_close_is_idempotent_and_final(self, bus: Bus) -> None:
        t = await bus.connect("test")
        queue = f"{bus.prefix}.closing"
        await t.declare_queue(QueueSpec(queue))
        await t.close()
        await t.close()
        with pytest.raises(TransportClosed):
            await t.publish("", queue, message("too late"))


async def test_a_nacked_message_of_a_batch_fails_the_batch_and_the_channel_goes_on(
    amqp_bus: Bus,
) -> None:
    """RabbitMQ nacks what a full ``reject-publish`` queue refuses: the batch raises
    ``TransportError``, the messages it took are there, and the next publishes on the
    same confirming channel are confirmed as before."""
    t = await amqp_bus.connect("test")
    exchange, queue = f"{amqp_bus.prefix}.x", f"{amqp_bus.prefix}.small"
    await t.declare_exchange(ExchangeSpec(exchange, "topic"))
    await t.declare_queue(
        QueueSpec(
            queue,
            bindings=[(exchange, "#")],
            arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
        )
    )
    with pytest.raises(TransportError, match="did not accept"):
        await t.publish_many(exchange, [("k", message(f"m{i}")) for i in range(5)])
    assert [d.body for d in await drain(t, queue)] == [b"m0", b"m1"]
    await t.publish_many(exchange, [("k", message("again"))])
    await t.publish(exchange, "k", message("single"))
    assert [d.body for d in await drain(t, queue)] == [b"again", b"single"]
