"""Consumer acks travel together (``contracts.amqp._Acks``); what reaches the broker must
be a valid sequence whatever the write queue does: RabbitMQ closes the channel on an
ack of a tag that is not outstanding, and with it every delivery in flight."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from contracts.amqp import _Acks


class Broker:
    """A channel that checks acks as RabbitMQ does; its first write waits (a full
    write queue) until released."""

    def __init__(self, tags: range) -> None:
        self.outstanding = set(tags)
        self.refused: list[int] = []
        self.release = asyncio.Event()
        self.writes = 0
        self.is_closed = False

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
