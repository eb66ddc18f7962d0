"""The publishing beneath aio-pika's API (``transport._aiormq_publish``) against aiormq's
own bookkeeping, on the real broker: each confirm, return and nack reaches the message
it is for, also among aiormq's own publishes on the same channel; a channel that the
broker closes mid-batch fails what it did not confirm; and nothing is left for aiormq's
reader to stumble on. These guard the pins on aiormq and pamqp in ``pyproject.toml``: a
new minor release is taken only once they pass on it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aio_pika
import aiormq
import aiormq.exceptions
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from module_sdk.testing import wait_for
from tests.support.tcp_proxy import TcpProxy
from transport import _aiormq_publish as beneath
from transport.port import OutgoingMessage

pytestmark = pytest.mark.broker

CONFIRM_WAIT = 30.0  # a bound on a broker's confirm, never expected to be reached
ROUNDS = 20


def message(body: str, **fields: object) -> OutgoingMessage:
    return OutgoingMessage(body=body.encode(), content_type="text/plain", **fields)  # type: ignore[arg-type]


async def outcome(future: asyncio.Future[object]) -> str:
    """What the broker answered for one publish, as aiormq's reader settled it."""
    try:
        await asyncio.wait_for(asyncio.shield(future), CONFIRM_WAIT)
    except aiormq.exceptions.PublishError:
        return "returned"
    except aiormq.exceptions.DeliveryError:
        return "nacked"
    except aiormq.exceptions.AMQPError as exc:
        return f"closed: {type(exc).__name__}"
    return "ack"


async def outcomes(batch: beneath.Batch) -> list[str]:
    try:
        return [await outcome(future) for future in batch.futures]
    finally:
        batch.forget()


async def aiormq_outcome(
    exchange: AbstractExchange, key: str, body: str, *, mandatory: bool = True
) -> str:
    """The same, for a publish through aio-pika's own ``Exchange.publish``."""
    future = asyncio.ensure_future(
        exchange.publish(aio_pika.Message(body.encode()), key, mandatory=mandatory)
    )
    return await outcome(future)


@dataclass
class Routes:
    """A topic exchange with three kinds of routing key: ``kept.*`` to an unbounded
    queue, ``small.*`` to a queue that holds two messages and makes the broker nack the
    rest (``reject-publish``), ``nobody.*`` to no queue (returned when mandatory)."""

    exchange: str
    kept: str
    small: str


@pytest.fixture
async def routes(amqp_connection: AbstractRobustConnection, prefix: str) -> AsyncIterator[Routes]:
    names = Routes(f"{prefix}.x", f"{prefix}.kept", f"{prefix}.small")
    # Exclusive queues go with this connection; the auto-delete exchange with them.
    channel = await amqp_connection.channel(publisher_confirms=False)
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True
    )
    kept = await channel.declare_queue(names.kept, exclusive=True)
    await kept.bind(exchange, "kept.#")
    small = await channel.declare_queue(
        names.small,
        exclusive=True,
        arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
    )
    await small.bind(exchange, "small.#")
    yield names
    await channel.close()


async def confirming(connection: AbstractRobustConnection) -> AbstractChannel:
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def bodies(connection: AbstractRobustConnection, queue: str) -> list[str]:
    """Every message in ``queue`` now, taken off it."""
    channel = await connection.channel(publisher_confirms=False)
    target = await channel.get_queue(queue, ensure=False)
    taken: list[str] = []
    while (got := await target.get(no_ack=True, fail=False)) is not None:
        taken.append(got.body.decode())
    await channel.close()
    return taken


def aiormq_complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What aiormq's reader logged about a frame it could not place (a confirm for a tag
    it does not know, a return it cannot match): each means a publish it lost track of."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiormq") and r.levelno >= logging.WARNING
    ]


def batch_of(keys: Sequence[str]) -> list[tuple[str, OutgoingMessage]]:
    return [(key, message(key)) for key in keys]


async def test_each_message_of_a_batch_gets_its_own_confirm_return_or_nack(
    amqp_connection: AbstractRobustConnection, routes: Routes, caplog: pytest.LogCaptureFixture
) -> None:
    """In one batch, a routed message is acked, an unroutable mandatory one returned
    and one a full ``reject-publish`` queue refuses nacked, each on its own future, in
    the batch's order; unroutable and not mandatory, it is simply acked."""
    caplog.set_level(logging.DEBUG, logger="aiormq")
    channel = await confirming(amqp_connection)
    underlay = await beneath.underlay(channel)
    keys = ["kept.0", "nobody.1", "small.2", "small.3", "small.4", "kept.5", "nobody.6"]
    batch = await beneath.publish_confirmed(underlay, routes.exchange, batch_of(keys), True)
    assert await outcomes(batch) == [
        "ack",
        "returned",
        "ack",
        "ack",
        "nacked",
        "ack",
        "returned",
    ]
    batch = await beneath.publish_confirmed(
        underlay, routes.exchange, batch_of(["nobody.7"]), False
    )
    assert await outcomes(batch) == ["ack"]
    assert await bodies(amqp_connection, routes.kept) == ["kept.0", "kept.5"]
    assert await bodies(amqp_connection, routes.small) == ["small.2", "small.3"]
    # aiormq's own publishes on the same channel still get their own answers.
    exchange = await channel.get_exchange(routes.exchange, ensure=False)
    assert await aiormq_outcome(exchange, "kept.8", "kept.8") == "ack"
    assert await aiormq_outcome(exchange, "nobody.9", "nobody.9") == "returned"
    await wait_for(lambda: not underlay.confirmations, what="the last confirms")
    assert aiormq_complaints(caplog) == []
    await channel.close()


async def test_confirms_stay_matched_among_concurrent_batches_and_aiormqs_own_publishes(
    amqp_connection: AbstractRobustConnection, routes: Routes, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches and aio-pika's own publishes, all at once on one confirming channel, many
    times over: every publish gets the answer meant for it (a confirm counted for the
    wrong delivery tag would shift them), none waits forever, the channel's bookkeeping
    ends empty, and aiormq's reader never meets a confirm or a return it cannot place
    (which a ``multiple`` confirm for a tag already dropped would make it ignore whole)."""
    caplog.set_level(logging.DEBUG, logger="aiormq")
    channel = await confirming(amqp_connection)
    underlay = await beneath.underlay(channel)
    exchange = await channel.get_exchange(routes.exchange, ensure=False)

    async def ours(round_: int, i: int) -> list[str]:
        keys = [f"kept.{round_}.{i}.a", f"nobody.{round_}.{i}", f"kept.{round_}.{i}.b"]
        batch = await beneath.publish_confirmed(underlay, routes.exchange, batch_of(keys), True)
        return await outcomes(batch)

    async def theirs(round_: int, i: int) -> list[str]:
        key = f"nobody.{round_}.{i}" if i % 4 == 2 else f"kept.{round_}.{i}"
        return [await aiormq_outcome(exchange, key, key)]

    for round_ in range(ROUNDS):
        results = await asyncio.gather(
            *(ours(round_, i) if i % 2 else theirs(round_, i) for i in range(12))
        )
        for i, result in enumerate(results):
            if i % 2:
                assert result == ["ack", "returned", "ack"], (round_, i)
            else:
                assert result == ["returned" if i % 4 == 2 else "ack"], (round_, i)
    await wait_for(lambda: not underlay.confirmations, what="the last confirms")
    assert underlay.message_id_delivery_tag == {}
    assert aiormq_complaints(caplog) == []
    kept = await bodies(amqp_connection, routes.kept)
    # Per round: two of each of our six batches, three of aio-pika's six publishes.
    assert len(kept) == len(set(kept)) == ROUNDS * (6 * 2 + 3)
    await channel.close()


async def test_a_batch_given_up_on_leaves_its_late_confirms_harmless(
    amqp_url: str,
    amqp_connection: AbstractRobustConnection,
    routes: Routes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch is given up on before its confirms come (as a publish that reaches
    ``ConfirmTimeout`` is): when they do come, late (through a slow link), aiormq's
    reader drops them quietly, and an aio-pika publish sent just before the batch,
    whose confirm the broker may fold into the same ``multiple`` confirm, is still
    confirmed, as is the next batch."""
    caplog.set_level(logging.DEBUG, logger="aiormq")
    async with TcpProxy.for_url(amqp_url) as proxy:
        connection = await aio_pika.connect_robust(
            proxy.url_for(amqp_url), client_properties={"connection_name": routes.exchange}
        )
        try:
            channel = await confirming(connection)
            underlay = await beneath.underlay(channel)
            exchange = await channel.get_exchange(routes.exchange, ensure=False)
            proxy.latency = 0.2  # each way: no confirm can come back within 0.4 s
            start = underlay.delivery_tag
            before = asyncio.ensure_future(
                exchange.publish(aio_pika.Message(b"before"), "kept.before")
            )
            await wait_for(lambda: underlay.delivery_tag > start, what="aio-pika's publish")
            keys = [f"kept.{i}" for i in range(5)]
            batch = await beneath.publish_confirmed(underlay, routes.exchange, batch_of(keys), True)
            batch.forget()  # given up on at once: its confirms are all still to come
            assert await outcome(before) == "ack"
            after = await beneath.publish_confirmed(
                underlay, routes.exchange, batch_of(["kept.after"]), True
            )
            assert await outcomes(after) == ["ack"]
            await wait_for(lambda: not underlay.confirmations, what="the late confirms")
            assert underlay.message_id_delivery_tag == {}
            assert aiormq_complaints(caplog) == []
        finally:
            await connection.close()
    assert await bodies(amqp_connection, routes.kept) == ["before", *keys, "kept.after"]


async def test_a_channel_closed_mid_batch_fails_what_it_did_not_confirm(
    amqp_connection: AbstractRobustConnection, routes: Routes
) -> None:
    """The broker closes the channel at the batch's fourth message (a ``user_id`` that
    is not the connection's): the messages before it are routed, the ones from it on are
    not, and every future is settled, the unconfirmed ones with the channel's close
    reason. The robust channel is then reopened and a batch on it is confirmed (its
    delivery tags counted afresh)."""
    channel = await confirming(amqp_connection)
    underlay = await beneath.underlay(channel)
    items = batch_of(["kept.0", "kept.1", "kept.2"])
    items.append(("kept.3", message("kept.3", user_id="somebody-else")))
    items.extend(batch_of(["kept.4", "kept.5"]))
    batch = await beneath.publish_confirmed(underlay, routes.exchange, items, True)
    got = await outcomes(batch)
    assert all(answer in {"ack", "closed: ChannelPreconditionFailed"} for answer in got[:3]), got
    assert got[3:] == ["closed: ChannelPreconditionFailed"] * 3
    assert await bodies(amqp_connection, routes.kept) == ["kept.0", "kept.1", "kept.2"]
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await beneath.publish_confirmed(underlay, routes.exchange, batch_of(["kept.x"]), True)

    await wait_for(lambda: not channel.is_closed, timeout=15, what="the channel to reopen")
    reopened = await beneath.underlay(channel)
    assert reopened is not underlay
    batch = await beneath.publish_confirmed(reopened, routes.exchange, batch_of(["kept.6"]), True)
    assert await outcomes(batch) == ["ack"]
    assert await bodies(amqp_connection, routes.kept) == ["kept.6"]
    await channel.close()


async def test_send_now_publishes_in_call_order_without_confirms(
    amqp_connection: AbstractRobustConnection, routes: Routes
) -> None:
    """Unconfirmed sends to the default exchange (replies) arrive whole and in call
    order, a body larger than one frame included, with the properties they were given."""
    channel = await amqp_connection.channel(publisher_confirms=False)
    underlay = await beneath.underlay(channel)
    taken: list[tuple[str, str | None, str | None]] = []

    async def take(got: AbstractIncomingMessage) -> None:
        taken.append((got.body.decode(), got.correlation_id, got.content_type))

    queue = await channel.get_queue(routes.kept, ensure=False)
    await queue.consume(take, no_ack=True)
    big = "x" * (underlay.max_content_size * 2 + 7)
    for body in ["one", big, "three"]:
        props = beneath.properties(message(body, correlation_id=f"c-{len(body)}"))
        await beneath.send_now(underlay, routes.kept, body.encode(), props)
    await wait_for(lambda: len(taken) == 3, what="the three sends")
    assert taken == [
        ("one", "c-3", "text/plain"),
        (big, f"c-{len(big)}", "text/plain"),
        ("three", "c-5", "text/plain"),
    ]
    await channel.close()
