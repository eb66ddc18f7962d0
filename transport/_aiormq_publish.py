"""Publishing beneath aio-pika's API: the one place that uses aiormq's channel internals
and pamqp's frames. Written for aiormq 7.2 and pamqp 4.0, pinned to those minor versions
in ``pyproject.toml``; ``tests/bus/test_aiormq_publish.py`` checks it against their
behaviour on the broker (confirms, returns, nacks, a channel closed mid-batch).

Why not ``exchange.publish`` per message, gathered: aiormq's ``basic_publish`` holds the
channel's lock until the writer has put the message on the socket, so each message of a
batch costs a task, a lock hand-over, a few passes of the event loop and a socket write
of its own: several times the CPU per message of one write per batch, and publishing is
most of what the outbox relay does. Here a batch is marshalled as one write, and each
message is registered for its confirm and return exactly where aiormq's frame reader
looks for them; unconfirmed sends (replies) skip ``basic_publish`` likewise.

What this relies on, on an open ``aiormq.Channel``: ``lock`` (held while tags are
taken), ``delivery_tag`` (the last tag used; the broker counts publishes from 1 per
channel), ``confirmations`` (tag → future, settled by the reader on ack, nack, return or
close), ``message_id_delivery_tag`` (how the reader finds a returned message's tag),
``write_queue`` (the connection's bounded frame queue), ``number``, ``max_content_size``
and ``create_future`` (a future the channel fails when it closes).
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Sequence
from datetime import UTC
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractChannel
from aiormq import spec as amqp_spec
from aiormq.abc import ChannelFrame
from pamqp import encode as pamqp_encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from transport.port import OutgoingMessage, TransportError

__all__ = ["Batch", "FastProperties", "properties", "publish_confirmed", "send_now", "underlay"]

_OCTET = struct.Struct(">B")
_FLAGS = struct.Struct(">H")
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_TRANSIENT = int(aio_pika.DeliveryMode.NOT_PERSISTENT)


async def underlay(channel: AbstractChannel) -> aiormq.Channel:
    """aiormq's channel under an aio-pika one (its write queue, lock and delivery tags
    are only on the concrete class)."""
    found = await channel.get_underlay_channel()
    if not isinstance(found, aiormq.Channel):
        raise TransportError(f"unexpected channel type {type(found).__name__}")
    return found


def _short(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise TypeError(f"string exceeds maximum length of 255 bytes: {value[:40]!r}…")
    return _OCTET.pack(len(raw)) + raw


class FastProperties(amqp_spec.Basic.Properties):
    """``Basic.Properties`` with a direct ``marshal``: the same bytes as pamqp's
    generic one (which looks up and dispatches on each property's type) at a fraction
    of its cost, which is a good share of every publish."""

    def marshal(self) -> bytes:
        flags = 0
        parts: list[bytes] = []
        # pamqp leaves out exactly the properties that are None or "".
        if self.content_type:
            flags |= 0x8000
            parts.append(_short(self.content_type))
        if self.content_encoding:
            flags |= 0x4000
            parts.append(_short(self.content_encoding))
        if self.headers is not None:
            flags |= 0x2000
            parts.append(pamqp_encode.field_table(self.headers))
        if self.delivery_mode is not None:
            flags |= 0x1000
            parts.append(_OCTET.pack(self.delivery_mode))
        if self.priority is not None:
            flags |= 0x0800
            parts.append(_OCTET.pack(self.priority))
        for flag, value in (
            (0x0400, self.correlation_id),
            (0x0200, self.reply_to),
            (0x0100, self.expiration),
            (0x0080, self.message_id),
        ):
            if value:
                flags |= flag
                parts.append(_short(value))
        if self.timestamp is not None:
            flags |= 0x0040
            parts.append(pamqp_encode.timestamp(self.timestamp))
        for flag, value in (
            (0x0020, self.message_type),
            (0x0010, self.user_id),
            (0x0008, self.app_id),
            (0x0004, self.cluster_id),
        ):
            if value:
                flags |= flag
                parts.append(_short(value))
        return _FLAGS.pack(flags) + b"".join(parts)


def properties(message: OutgoingMessage) -> amqp_spec.Basic.Properties:
    """The AMQP properties of a message, built directly: an ``aio_pika.Message`` per
    publish (validated attribute by attribute, then converted to these same
    properties) costs more than the publish itself on the command path."""
    return FastProperties(
        content_type=message.content_type,
        headers=dict(message.headers) if message.headers else None,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_type=message.type,
        user_id=message.user_id,
        timestamp=message.timestamp.astimezone(UTC) if message.timestamp else None,
        delivery_mode=_PERSISTENT if message.persistent else _TRANSIENT,
        expiration=str(message.expiration_ms) if message.expiration_ms else None,
    )


async def send_now(
    channel: aiormq.Channel, routing_key: str, body: bytes, props: amqp_spec.Basic.Properties
) -> None:
    """Put an unconfirmed publish to the default exchange straight on the connection's
    write queue: its frames marshalled into one piece, in call order.

    On a channel without publisher confirms there is no delivery tag to keep in step,
    so aiormq's ``basic_publish`` (a lock, a timeout scope and futures per message)
    buys nothing here, and replies are the coordinator's most frequent publish.
    """
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    size = channel.max_content_size
    frames: list[Any] = [
        amqp_spec.Basic.Publish(exchange="", routing_key=routing_key, mandatory=False),
        ContentHeader(properties=props, body_size=len(body)),
    ]
    frames.extend(ContentBody(body[i : i + size]) for i in range(0, len(body), size))
    # The writer's queue is bounded: waiting for room is the backpressure.
    await channel.write_queue.put(ChannelFrame.marshall(channel.number, frames))


class Batch:
    """The publishes of one ``publish_confirmed`` call: their confirms, in order."""

    __slots__ = ("_channel", "_first", "_ids", "futures")

    def __init__(
        self,
        channel: aiormq.Channel,
        first: int,
        ids: list[str],
        futures: list[asyncio.Future[Any]],
    ) -> None:
        self._channel = channel
        self._first = first  # the delivery tag of the first message
        self._ids = ids  # message ids, in order
        #: Per message, in order: the broker's ``Basic.Ack`` frame, or
        #: ``aiormq.exceptions.PublishError`` (returned), ``DeliveryError`` (nacked),
        #: or the exception the channel closed with.
        self.futures = futures

    def forget(self) -> None:
        """Done with the batch, confirmed or given up on: cancel the confirms still
        awaited and drop the return lookups. A registered tag stays until the broker's
        confirm clears it, as aiormq leaves its own: the reader then drops a late
        confirm quietly, where an unknown tag would make it ignore a ``multiple``
        confirm whole, the confirms of other publishes in it too."""
        by_id = self._channel.message_id_delivery_tag
        for tag, (message_id, future) in enumerate(
            zip(self._ids, self.futures, strict=True), self._first
        ):
            if future.done() and not future.cancelled():
                future.exception()  # looked at: a failure given up on is not logged
            future.cancel()  # nothing on a settled one
            if by_id.get(message_id) == tag:
                del by_id[message_id]


async def publish_confirmed(
    channel: aiormq.Channel,
    exchange: str,
    items: Sequence[tuple[str, OutgoingMessage]],
    mandatory: bool,
) -> Batch:
    """Put a batch of publishes on a confirming channel as one write, each
    registered for its confirm (and its return) where aiormq's reader looks.

    The channel's lock is taken once for the batch, which keeps its delivery tags in
    step with what the broker counts, among aiormq's own publishes too. Call
    ``forget`` on the result once done with it."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    size = channel.max_content_size
    frames: list[Any] = []
    ids: list[str] = []
    for routing_key, message in items:
        props = properties(message)
        if not props.message_id:
            # A return is matched to its publish by message id.
            props.message_id = uuid.uuid4().hex
        ids.append(props.message_id)
        body = message.body
        frames.append(
            amqp_spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        )
        frames.append(ContentHeader(properties=props, body_size=len(body)))
        frames.extend(ContentBody(body[i : i + size]) for i in range(0, len(body), size))
    data = ChannelFrame.marshall(channel.number, frames)
    async with channel.lock:
        first = channel.delivery_tag + 1
        futures = [channel.create_future() for _ in ids]
        for tag, (message_id, future) in enumerate(zip(ids, futures, strict=True), first):
            channel.confirmations[tag] = future
            channel.message_id_delivery_tag[message_id] = tag
        channel.delivery_tag += len(ids)
        try:
            # The writer's queue is bounded: waiting for room is the backpressure.
            await channel.write_queue.put(data)
        except BaseException:
            # Not queued, so the broker never counts these: give the tags back.
            channel.delivery_tag -= len(ids)
            _unregister(channel, ids, first)
            for future in futures:
                future.cancel()
            raise
    return Batch(channel, first, ids, futures)


def _unregister(channel: aiormq.Channel, ids: list[str], first: int) -> None:
    """Take back the registrations of publishes that never reached the write queue."""
    by_id = channel.message_id_delivery_tag
    for tag, message_id in enumerate(ids, first):
        channel.confirmations.pop(tag, None)
        if by_id.get(message_id) == tag:
            del by_id[message_id]
