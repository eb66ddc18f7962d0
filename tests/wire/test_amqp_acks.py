"""Consumer acks travel together (``transport.amqp._Acks``); what reaches the broker must
be a valid sequence whatever the write queue does: RabbitMQ closes the channel on an
ack of a tag that is not outstanding, and with it every delivery in flight."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from transport.amqp import AmqpDelivery, _Acks
from transport.port import TransportError


class Broker:
    """A channel that checks acks as RabbitMQ does; its first write waits (a full
    write queue) until released."""

    def __init__(self, tags: range) -> None:
        self.outstanding = set(tags)
        self.refused: list[int] = []
        self.release = asyncio.Event()
        self.writes = 0
        self.is_closed = False
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.writes += 1
        if self.writes == 1:
            await self.release.wait()
        if tag not in self.outstanding:
            self.refused.append(tag)
            return
        covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        self.outstanding -= covered


def delivery(channel: Broker, tag: int) -> Any:
    return SimpleNamespace(channel=channel, delivery_tag=tag)


async def test_a_flush_waiting_for_the_write_queue_is_not_overtaken() -> None:
    broker = Broker(range(1, 7))
    acks = _Acks()
    messages = [delivery(broker, tag) for tag in range(1, 7)]
    for m in messages:
        acks.opened(m)
    acks.done(messages[0])
    acks.done(messages[1])
    await asyncio.sleep(0)  # the first flush runs and waits for room
    await asyncio.sleep(0)
    assert broker.writes == 1
    for m in messages[2:4]:
        acks.done(m)
    await asyncio.sleep(0.01)  # a second flush is due meanwhile
    broker.release.set()
    await asyncio.sleep(0.01)
    for m in messages[4:]:
        acks.done(m)
    await acks.flush()
    assert broker.refused == []
    assert broker.outstanding == set()


async def test_acks_behind_a_delivery_in_progress_are_sent_alone_and_never_cover_it() -> None:
    broker = Broker(range(1, 6))
    broker.release.set()
    acks = _Acks()
    messages = [delivery(broker, tag) for tag in range(1, 6)]
    for m in messages:
        acks.opened(m)
    for m in (messages[1], messages[3]):  # 1 and 3 still being handled
        acks.done(m)
    await acks.flush()
    assert broker.outstanding == {1, 3, 5}
    acks.forget(messages[0])  # requeued instead
    broker.outstanding.discard(1)
    acks.done(messages[2])
    acks.done(messages[4])
    await acks.flush()
    assert broker.refused == []
    assert broker.outstanding == set()


class _Message:
    """An incoming message; with ``failure``, one whose nack or reject never reaches
    the write queue."""

    def __init__(self, channel: Broker, tag: int, failure: BaseException | None = None) -> None:
        self.channel = channel
        self.delivery_tag = tag
        self.failure = failure
        for name in ("routing_key", "exchange", "content_type", "headers", "message_id"):
            setattr(self, name, None)
        for name in ("correlation_id", "reply_to", "type", "user_id"):
            setattr(self, name, None)
        self.body = b""
        self.redelivered = False

    async def nack(self, requeue: bool = True) -> None:
        assert self.failure is not None
        raise self.failure

    async def reject(self, requeue: bool = False) -> None:
        assert self.failure is not None
        raise self.failure


@pytest.mark.parametrize("settle", ["requeue", "reject"])
@pytest.mark.parametrize(
    "failure",
    [asyncio.CancelledError(), ConnectionResetError("write failed")],
    ids=["cancelled", "write-failed"],
)
async def test_a_requeue_or_reject_never_sent_is_never_covered_by_a_multiple_ack(
    settle: str, failure: BaseException
) -> None:
    """A delivery whose nack (or reject) frame was never queued stays outstanding in
    the ack bookkeeping: acking the deliveries after it must not ack it too."""
    broker = Broker(range(1, 4))
    broker.release.set()
    acks = _Acks()
    unsent = AmqpDelivery(_Message(broker, 1, failure), acks=acks)  # type: ignore[arg-type]
    later = [AmqpDelivery(_Message(broker, tag), acks=acks) for tag in (2, 3)]  # type: ignore[arg-type]
    with pytest.raises((asyncio.CancelledError, TransportError)):
        await getattr(unsent, settle)()
    for d in later:
        await d.ack()
    await acks.flush()
    assert broker.refused == []
    assert broker.outstanding == {1}, "an unhandled message was acknowledged"


async def test_delayed_acks_go_out_together_after_the_delay_or_once_enough_are_done() -> None:
    """``ack_delay``: deliveries done one per pass share one ``multiple`` ack when the
    delay is up; reaching ``enough`` done sends them at once."""
    broker = Broker(range(1, 11))
    broker.release.set()
    acks = _Acks(0.05, enough=4)
    messages = [delivery(broker, tag) for tag in range(1, 11)]
    for m in messages:
        acks.opened(m)
    for m in messages[:3]:
        acks.done(m)
        await asyncio.sleep(0)  # one per pass of the loop
    await asyncio.sleep(0.01)
    assert broker.writes == 0  # waiting for the delay (3 < enough)
    await asyncio.sleep(0.08)
    assert (broker.writes, broker.outstanding) == (1, set(range(4, 11)))
    for m in messages[3:7]:
        acks.done(m)  # the fourth is enough: no waiting for the delay
    await asyncio.sleep(0.01)
    assert (broker.writes, broker.outstanding) == (2, set(range(8, 11)))
    assert broker.refused == []
