"""The broker port: what sessionbus needs from a message broker, in one place.

Two implementations share it: ``transport.amqp`` (RabbitMQ through aio-pika) and
``transport.memory`` (an in-process broker with the same routing, acknowledgement,
dead-lettering and identity rules, for module authors' tests and the embedded demo).
The coordinator and the module SDK are written against this port only.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from contracts.topology import ExchangeSpec, QueueSpec

__all__ = [
    "DIRECT_REPLY_TO",
    "AccessRefused",
    "ConfirmTimeout",
    "ConsumerHandle",
    "Delivery",
    "Handler",
    "OutgoingMessage",
    "QueueStats",
    "ReconnectCallback",
    "ResourceLocked",
    "Transport",
    "TransportClosed",
    "TransportError",
    "Unroutable",
    "topic_matches",
]


class TransportError(Exception):
    """Root of every broker failure seen through the port (connection lost, refused
    publish, access refused). ``retryable`` tells whether trying again may succeed."""

    retryable: bool = True


class TransportClosed(TransportError):
    """The transport was closed; nothing more can be sent or received."""

    retryable = False


class Unroutable(TransportError):
    """A mandatory message matched no queue."""


class ConfirmTimeout(TransportError):
    """The broker did not confirm a publish in time (a stalled connection, a blocked
    or overloaded node). Whether it was routed is unknown: publish it again — every
    consumer drops the duplicate by its event id or version."""


class AccessRefused(TransportError):
    """The broker refused the operation for this user (permissions, forged user_id)."""

    retryable = False


class ResourceLocked(TransportError):
    """The queue is exclusive to another connection (or has its single active consumer
    elsewhere): RabbitMQ's RESOURCE_LOCKED. It may be free once the owner is gone."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to publish. ``user_id`` is checked by the broker against the
    connection's user: it is how the receiver knows who sent it."""

    body: bytes
    content_type: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    user_id: str | None = None
    timestamp: datetime | None = None
    persistent: bool = True
    expiration_ms: int | None = None


class Delivery(abc.ABC):
    """A received message and its settlement. Settle exactly once: ``ack``,
    ``requeue`` or ``reject`` (to the queue's dead-letter exchange, if any)."""

    body: bytes
    routing_key: str
    exchange: str
    content_type: str | None
    headers: Mapping[str, Any]
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    type: str | None
    user_id: str | None
    redelivered: bool

    @abc.abstractmethod
    async def ack(self) -> None: ...

    @abc.abstractmethod
    async def requeue(self) -> None:
        """Give the message back to the queue for another delivery."""

    @abc.abstractmethod
    async def reject(self) -> None:
        """Refuse the message without requeue (dead-lettered by the broker)."""

    @property
    @abc.abstractmethod
    def settled(self) -> bool: ...

    def to_outgoing(self, **changes: Any) -> OutgoingMessage:
        """This message as one to publish again (dead-lettering, replay)."""
        fields: dict[str, Any] = {
            "body": self.body,
            "content_type": self.content_type or "application/octet-stream",
            "headers": dict(self.headers),
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "type": self.type,
        }
        fields.update(changes)
        return OutgoingMessage(**fields)


Handler = Callable[[Delivery], Awaitable[None]]

#: Called after the connection was lost and restored (see ``Transport.on_reconnect``).
ReconnectCallback = Callable[[], Awaitable[None]]


class ConsumerHandle(abc.ABC):
    """A running consumer."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop receiving new deliveries (idempotent). Unsettled ones stay with the
        caller to settle."""

    async def close(self) -> None:
        """Cancel and release the consumer's channel: deliveries still unsettled go
        back to the queue."""
        await self.cancel()


@dataclass(frozen=True, slots=True)
class QueueStats:
    name: str
    messages: int
    consumers: int


class Transport(abc.ABC):
    """One connection to a broker, as the coordinator and the SDK use it."""

    #: The broker user this transport is connected as (what ``user_id`` must be).
    user: str
    #: How many times the connection was lost and restored since ``connect``.
    reconnects: int = 0

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; safe to call twice."""

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def declare_exchange(self, spec: ExchangeSpec) -> None: ...

    @abc.abstractmethod
    async def declare_queue(self, spec: QueueSpec) -> None:
        """Declare a queue and its bindings (idempotent for identical arguments).

        An exclusive queue goes with the connection that declared it: one consumed
        through this transport is declared again, with its bindings, when the
        connection is restored (what was routed in between is lost: see
        ``on_reconnect``)."""

    @abc.abstractmethod
    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        """Have ``callback`` awaited each time the connection was lost and restored,
        once its consumers consume again; returns what removes it.

        Durable queues kept what was routed to them meanwhile; a consumer of an
        exclusive queue (declared again, empty) learns here that it may have missed
        messages. ``reconnects`` is already counted when it runs. A callback is
        not retried: the AMQP transport logs what one raises (the in-process one,
        whose ``reconnected`` simulates a restore, lets it through)."""

    @abc.abstractmethod
    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, mandatory: bool = True
    ) -> None:
        """Publish and wait for the broker's confirm. Raises ``Unroutable`` for a
        mandatory message that matched no queue, ``TransportError`` for a nack."""

    async def publish_many(
        self, exchange: str, items: Sequence[tuple[str, OutgoingMessage]]
    ) -> None:
        """Publish a batch with pipelined confirms: all are sent before any confirm is
        awaited. Raises if any one was not confirmed."""
        results = await asyncio.gather(
            *(self.publish(exchange, key, msg) for key, msg in items), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @abc.abstractmethod
    async def send(self, routing_key: str, message: OutgoingMessage) -> None:
        """Publish to the default exchange without waiting for a confirm (replies,
        heartbeats: loss is tolerated, the sender retries or sends again)."""

    @abc.abstractmethod
    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int = 64,
        arguments: Mapping[str, Any] | None = None,
        ack_delay: float = 0.0,
    ) -> ConsumerHandle:
        """Deliver ``queue``'s messages to ``handler``, at most ``prefetch`` unsettled.

        ``ack_delay``: seconds an ack may wait to go out with the following ones (one
        ``multiple`` ack for many; sent sooner once half the prefetch is waiting). For a
        consumer that receives messages one at a time at a high rate and may see a few
        redelivered after a lost connection (the console's live feed); 0 sends the acks
        of each pass of the event loop at its end."""

    @abc.abstractmethod
    async def request(self, queue: str, message: OutgoingMessage, *, timeout: float) -> Delivery:
        """Send to ``queue`` with a direct reply-to and wait for the reply whose
        correlation id matches. Raises ``TimeoutError``."""

    @abc.abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """Take one message from a queue (unsettled), or ``None`` when empty."""

    @abc.abstractmethod
    async def queue_stats(self, queue: str) -> QueueStats | None:
        """Depth and consumers of a queue, ``None`` if it does not exist."""

    @abc.abstractmethod
    async def delete_queue(self, queue: str) -> None: ...


DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    return _match(pattern.split("."), key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in {"*", words[0]}) and _match(rest, words[1:])
