"""What the RabbitMQ transport does while aio-pika restores a lost connection
(``transport.amqp``): nothing is sent on a channel that is open again but not yet
restored whole, every new broker connection a publish goes out on counts as a
reconnect, whether or not aio-pika finished restoring it, and acks waiting for room on
a connection that is lost do not hold back the acks of the consumer's next channel."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any
from unittest.mock import create_autospec

import aio_pika
from aio_pika.tools import CallbackCollection

from transport.amqp import AmqpTransport, _Acks, _Restored


class Reopening:
    """A robust channel as aio-pika reopens it: open on the broker first, then its
    queues and consumers declared again (``ready()`` waits for that), then its reopen
    callbacks."""

    def __init__(self) -> None:
        self.channel: Any = create_autospec(aio_pika.RobustChannel, instance=True)
        self.channel.close_callbacks = CallbackCollection(self.channel)
        self.channel.reopen_callbacks = CallbackCollection(self.channel)
        self.channel.is_closed = False
        self.restored = asyncio.Event()
        self.restored.set()
        self.channel.ready.side_effect = self.restored.wait

    async def lose(self) -> None:
        self.channel.is_closed = True
        self.restored.clear()
        await self.channel.close_callbacks(None)

    def open_again(self) -> None:
        self.channel.is_closed = False  # open, its consumers not yet registered

    async def restore(self) -> None:
        self.restored.set()
        await self.channel.reopen_callbacks()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_send_waits_while_its_channel_is_open_again_but_its_consumers_are_not() -> None:
    # The request path's channel consumes direct reply-to: a request sent before that
    # consumer is back makes the broker close the channel, then the whole connection.
    transport = AmqpTransport("amqp://guest:guest@127.0.0.1:1/")
    reopening = Reopening()
    restored = _Restored(reopening.channel)
    assert await transport._ready(reopening.channel, restored) is reopening.channel

    await reopening.lose()
    reopening.open_again()
    waiting = asyncio.create_task(transport._ready(reopening.channel, restored))
    await settle()
    assert not waiting.done(), "sent on a channel whose consumers are not restored yet"

    await reopening.restore()
    assert await asyncio.wait_for(waiting, 5) is reopening.channel


def _connection(underlying: object) -> Any:
    return SimpleNamespace(transport=SimpleNamespace(connection=underlying))


async def test_a_publish_on_a_connection_aio_pika_never_reported_restored_counts() -> None:
    # aio-pika reports a connection restored only once all its channels are; one whose
    # restore failed (a stream not back yet) is closed and never reported, though its
    # publishing channel was already used. The relay must still hear of it.
    transport = AmqpTransport("amqp://guest:guest@127.0.0.1:1/")
    first, failed, second = object(), object(), object()
    transport._underlying = first
    transport._connection_seen(first)
    assert transport.reconnects == 0

    transport._connection_seen(failed)  # a publish on the half-restored connection
    assert transport.reconnects == 1

    transport._connection_seen(second)  # published on before its restore finished …
    transport._connection = _connection(second)
    transport._on_reconnect()  # … and then reported restored: counted once
    assert transport.reconnects == 2


class Channel:
    """An aiormq channel as ``_Acks`` uses it. ``full``: its connection's write queue
    has no room, and (once lost) never will."""

    def __init__(self, *, full: bool = False) -> None:
        self.full = full
        self.acks: list[tuple[int, bool]] = []
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def is_closed(self) -> bool:
        return self.closing.done()

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.full:
            await asyncio.Event().wait()  # the lost connection's writer takes nothing more
        self.acks.append((tag, multiple))


def delivery(channel: Channel, tag: int) -> Any:
    return SimpleNamespace(channel=channel, delivery_tag=tag)


async def test_acks_stuck_on_a_lost_connection_do_not_hold_back_the_next_channels() -> None:
    acks = _Acks()
    lost = Channel(full=True)
    before = delivery(lost, 7)
    acks.opened(before)
    acks.done(before)
    await settle()  # that flush waits for room on the write queue …
    lost.closing.set_result(None)  # … and the connection goes

    restored = Channel()  # the consumer's channel after the restore
    after = delivery(restored, 1)
    acks.opened(after)
    acks.done(after)
    await asyncio.wait_for(acks.flush(), 5)
    assert restored.acks == [(1, True)]
