"""An in-process broker behind the transport port.

It keeps the broker rules sessionbus depends on: topic and fanout routing with
alternate exchanges, queues with prefetch, ack / requeue / reject, dead-lettering and
delivery limits, single active consumer, stream queues read from an offset, direct
reply-to, and the ``user_id`` check that makes identity trustworthy. It is for tests
and the embedded demo: one process, nothing persisted.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.topology import ExchangeSpec, QueueSpec
from transport.port import (
    DIRECT_REPLY_TO,
    AccessRefused,
    ConsumerHandle,
    Delivery,
    Handler,
    OutgoingMessage,
    QueueStats,
    ReconnectCallback,
    ResourceLocked,
    Transport,
    TransportClosed,
    TransportError,
    Unroutable,
    topic_matches,
)

__all__ = ["MemoryBroker", "MemoryTransport", "Permissions"]

_DEFAULT = ""


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a user may write to (publish to exchanges matching ``write``) and read
    from (consume queues matching ``read``), as RabbitMQ regular expressions."""

    write: str = ".*"
    read: str = ".*"


@dataclass(slots=True)
class _Message:
    routing_key: str
    exchange: str
    message: OutgoingMessage
    deliveries: int = 0
    offset: int = 0
    # When the broker took it: what a stream's timestamp offset goes by (as RabbitMQ's
    # chunk time does), not the publisher's optional timestamp property.
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(slots=True)
class _Consumer:
    transport: MemoryTransport
    handler: Handler
    prefetch: int
    unacked: int = 0
    active: bool = True
    stream_offset: int | None = None


@dataclass(slots=True)
class _Queue:
    spec: QueueSpec
    ready: deque[_Message] = field(default_factory=deque)
    log: list[_Message] = field(default_factory=list)  # stream queues keep everything
    consumers: list[_Consumer] = field(default_factory=list)
    unacked: int = 0

    @property
    def is_stream(self) -> bool:
        return self.spec.arguments.get("x-queue-type") == "stream"

    @property
    def is_quorum(self) -> bool:
        return self.spec.arguments.get("x-queue-type") == "quorum"

    @property
    def single_active(self) -> bool:
        return bool(self.spec.arguments.get("x-single-active-consumer"))


class MemoryBroker:
    """One in-process broker; ``transport(user)`` connects to it as ``user``."""

    def __init__(self, users: Mapping[str, Permissions] | None = None) -> None:
        self.users = dict(users) if users is not None else None
        self.exchanges: dict[str, ExchangeSpec] = {}
        self.bindings: dict[str, list[tuple[str, str]]] = {}  # exchange -> (key, queue)
        self.queues: dict[str, _Queue] = {}
        self._replies: dict[str, MemoryTransport] = {}
        self._ids = itertools.count(1)

    def transport(self, user: str = "guest") -> MemoryTransport:
        return MemoryTransport(self, user)

    # -- routing ----------------------------------------------------------------------

    def route(self, exchange: str, routing_key: str, message: OutgoingMessage) -> int:
        """Deliver to every matching queue; returns how many queues took it."""
        if exchange == _DEFAULT:
            if routing_key.startswith(DIRECT_REPLY_TO + "."):
                owner = self._replies.get(routing_key)
                if owner is None:
                    return 0
                owner.on_reply(message)
                return 1
            queue = self.queues.get(routing_key)
            if queue is None:
                return 0
            self._enqueue(queue, _Message(routing_key, exchange, message))
            return 1
        spec = self.exchanges.get(exchange)
        if spec is None:
            raise TransportError(f"NOT_FOUND - no exchange '{exchange}'")
        targets = {
            queue
            for key, queue in self.bindings.get(exchange, [])
            if spec.type == "fanout"
            or (spec.type == "topic" and topic_matches(key, routing_key))
            or (spec.type == "direct" and key == routing_key)
        }
        for name in sorted(targets):
            self._enqueue(self.queues[name], _Message(routing_key, exchange, message))
        if not targets and "alternate-exchange" in spec.arguments:
            return self.route(str(spec.arguments["alternate-exchange"]), routing_key, message)
        return len(targets)

    def _enqueue(self, queue: _Queue, item: _Message) -> None:
        if queue.is_stream:
            item.offset = len(queue.log)
            queue.log.append(item)
        else:
            queue.ready.append(item)
            limit = queue.spec.arguments.get("x-max-length")
            while limit is not None and len(queue.ready) > int(limit):
                self._dead_letter(queue, queue.ready.popleft(), "maxlen")
        self.dispatch(queue)

    def _dead_letter(self, queue: _Queue, item: _Message, reason: str) -> None:
        dlx = queue.spec.arguments.get("x-dead-letter-exchange")
        if dlx is None:
            return
        headers = dict(item.message.headers)
        deaths = list(headers.get("x-death", []))
        deaths.insert(0, {"queue": queue.spec.name, "reason": reason, "count": 1})
        headers["x-death"] = deaths
        msg = OutgoingMessage(**{**_fields(item.message), "headers": headers})
        key = queue.spec.arguments.get("x-dead-letter-routing-key", item.routing_key)
        self.route(str(dlx), str(key), msg)

    # -- delivery ---------------------------------------------------------------------

    def dispatch(self, queue: _Queue) -> None:
        consumers = [c for c in queue.consumers if c.active]
        if queue.single_active:
            consumers = consumers[:1]
        if queue.is_stream:
            for consumer in consumers:
                while (
                    consumer.stream_offset is not None
                    and consumer.stream_offset < len(queue.log)
                    and consumer.unacked < consumer.prefetch
                ):
                    item = queue.log[consumer.stream_offset]
                    consumer.stream_offset += 1
                    self._deliver(queue, consumer, item, stream=True)
            return
        progress = True
        while queue.ready and progress:
            progress = False
            for consumer in consumers:
                if not queue.ready:
                    break
                if consumer.unacked < consumer.prefetch:
                    self._deliver(queue, consumer, queue.ready.popleft())
                    progress = True

    def _deliver(
        self, queue: _Queue, consumer: _Consumer, item: _Message, *, stream: bool = False
    ) -> None:
        item.deliveries += 1
        consumer.unacked += 1
        queue.unacked += 1
        delivery = MemoryDelivery(self, queue, item, consumer, stream=stream)
        consumer.transport.spawn(consumer.handler(delivery))

    def settle(
        self, queue: _Queue, consumer: _Consumer | None, item: _Message, outcome: str
    ) -> None:
        if consumer is not None:
            consumer.unacked -= 1
        queue.unacked -= 1
        if outcome == "requeue" and not queue.is_stream:
            limit = queue.spec.arguments.get("x-delivery-limit")
            if limit is not None and item.deliveries > int(limit):
                self._dead_letter(queue, item, "delivery_limit")
            else:
                queue.ready.appendleft(item)
        elif outcome == "reject" and not queue.is_stream:
            self._dead_letter(queue, item, "rejected")
        self.dispatch(queue)

    def register_reply(self, name: str, transport: MemoryTransport) -> None:
        self._replies[name] = transport

    def next_id(self) -> int:
        return next(self._ids)


def _fields(message: OutgoingMessage) -> dict[str, Any]:
    return {name: getattr(message, name) for name in OutgoingMessage.__slots__}


class MemoryDelivery(Delivery):
    def __init__(
        self,
        broker: MemoryBroker,
        queue: _Queue,
        item: _Message,
        consumer: _Consumer | None,
        *,
        stream: bool = False,
    ) -> None:
        self._broker = broker
        self._queue = queue
        self._item = item
        self._consumer = consumer
        self._settled = False
        msg = item.message
        self.body = msg.body
        self.routing_key = item.routing_key
        self.exchange = item.exchange
        self.content_type = msg.content_type
        headers = dict(msg.headers)
        if stream:
            headers["x-stream-offset"] = item.offset
        self.headers = headers
        self.message_id = msg.message_id
        self.correlation_id = msg.correlation_id
        self.reply_to = msg.reply_to
        self.type = msg.type
        self.user_id = msg.user_id
        self.redelivered = item.deliveries > 1

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self, outcome: str) -> None:
        if self._settled:
            raise TransportError("delivery already settled")
        self._settled = True
        self._broker.settle(self._queue, self._consumer, self._item, outcome)

    async def ack(self) -> None:
        self._settle("ack")

    async def requeue(self) -> None:
        self._settle("requeue")

    async def reject(self) -> None:
        self._settle("reject")


class _MemoryConsumerHandle(ConsumerHandle):
    def __init__(self, broker: MemoryBroker, queue: _Queue, consumer: _Consumer) -> None:
        self._broker = broker
        self._queue = queue
        self._consumer = consumer

    async def cancel(self) -> None:
        if self._consumer.active:
            self._consumer.active = False
            self._queue.consumers.remove(self._consumer)
            self._broker.dispatch(self._queue)


class MemoryTransport(Transport):
    """A connection to a ``MemoryBroker`` as one user."""

    def __init__(self, broker: MemoryBroker, user: str) -> None:
        self.broker = broker
        self.user = user
        self._open = False
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiting: dict[str, asyncio.Future[Delivery]] = {}
        self._reply_name = ""
        self._consumers: list[_MemoryConsumerHandle] = []
        self._reconnect_callbacks: list[ReconnectCallback] = []

    async def connect(self) -> None:
        if self.broker.users is not None and self.user not in self.broker.users:
            raise AccessRefused(f"ACCESS_REFUSED - login refused for user '{self.user}'")
        self._open = True
        self._reply_name = f"{DIRECT_REPLY_TO}.{self.broker.next_id()}"
        self.broker.register_reply(self._reply_name, self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._open = False
        for handle in self._consumers:
            await handle.cancel()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(TransportClosed("transport closed"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        self._reconnect_callbacks.append(callback)

        def remove() -> None:
            if callback in self._reconnect_callbacks:
                self._reconnect_callbacks.remove(callback)

        return remove

    async def reconnected(self) -> None:
        """Simulate a lost and restored connection: count it in ``reconnects`` and run
        the ``on_reconnect`` callbacks (there is no connection to lose in-process:
        queues, bindings and consumers all stay as they were)."""
        self._check()
        self.reconnects += 1
        for callback in list(self._reconnect_callbacks):
            await callback()

    def _check(self) -> None:
        if not self._open:
            raise TransportClosed("transport is not connected")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _may_write(self, exchange: str) -> None:
        users = self.broker.users
        if users is not None and not re.fullmatch(
            users[self.user].write, exchange or "amq.default"
        ):
            raise AccessRefused(
                f"ACCESS_REFUSED - write access to exchange '{exchange}' refused for user "
                f"'{self.user}'"
            )

    def _check_identity(self, message: OutgoingMessage) -> None:
        if message.user_id is not None and message.user_id != self.user:
            raise AccessRefused(
                f"PRECONDITION_FAILED - user_id property set to '{message.user_id}' but "
                f"authenticated user was '{self.user}'"
            )

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        self._check()
        current = self.broker.exchanges.get(spec.name)
        if current is not None and (current.type, dict(current.arguments)) != (
            spec.type,
            dict(spec.arguments),
        ):
            raise TransportError(f"PRECONDITION_FAILED - inequivalent arg for exchange {spec.name}")
        self.broker.exchanges[spec.name] = spec
        self.broker.bindings.setdefault(spec.name, [])

    async def declare_queue(self, spec: QueueSpec) -> None:
        self._check()
        queue = self.broker.queues.get(spec.name)
        if queue is None:
            queue = self.broker.queues[spec.name] = _Queue(spec)
        elif dict(queue.spec.arguments) != dict(spec.arguments):
            raise TransportError(f"PRECONDITION_FAILED - inequivalent arg for queue {spec.name}")
        for exchange, key in spec.bindings:
            if exchange not in self.broker.exchanges:
                raise TransportError(f"NOT_FOUND - no exchange '{exchange}'")
            binding = (key, spec.name)
            if binding not in self.broker.bindings[exchange]:
                self.broker.bindings[exchange].append(binding)

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, mandatory: bool = True
    ) -> None:
        self._check()
        self._may_write(exchange)
        self._check_identity(message)
        routed = self.broker.route(exchange, routing_key, message)
        if mandatory and routed == 0:
            raise Unroutable(f"NO_ROUTE - {exchange!r} has no queue for {routing_key!r}")

    async def send(self, routing_key: str, message: OutgoingMessage) -> None:
        self._check()
        self._check_identity(message)
        self.broker.route(_DEFAULT, routing_key, message)

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int = 64,
        arguments: Mapping[str, Any] | None = None,
        ack_delay: float = 0.0,  # acks here cost nothing: settled at once
    ) -> ConsumerHandle:
        self._check()
        target = self.broker.queues.get(queue)
        if target is None:
            raise TransportError(f"NOT_FOUND - no queue '{queue}'")
        users = self.broker.users
        if users is not None and not re.fullmatch(users[self.user].read, queue):
            raise AccessRefused(f"ACCESS_REFUSED - read access to queue '{queue}' refused")
        consumer = _Consumer(self, handler, max(1, prefetch))
        if target.is_stream:
            consumer.stream_offset = _stream_offset(
                target, (arguments or {}).get("x-stream-offset")
            )
        target.consumers.append(consumer)
        handle = _MemoryConsumerHandle(self.broker, target, consumer)
        self._consumers.append(handle)
        self.broker.dispatch(target)
        return handle

    async def request(self, queue: str, message: OutgoingMessage, *, timeout: float) -> Delivery:
        self._check()
        if message.correlation_id is None:
            raise ValueError("a request needs a correlation_id")
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self._waiting[message.correlation_id] = future
        try:
            msg = OutgoingMessage(**{**_fields(message), "reply_to": self._reply_name})
            self._check_identity(msg)
            self.broker.route(_DEFAULT, queue, msg)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(message.correlation_id, None)

    def on_reply(self, message: OutgoingMessage) -> None:
        waiter = self._waiting.get(message.correlation_id or "")
        if waiter is not None and not waiter.done():
            reply_queue = _Queue(QueueSpec(self._reply_name, durable=False))
            item = _Message(self._reply_name, _DEFAULT, message)
            reply_queue.unacked += 1
            waiter.set_result(MemoryDelivery(self.broker, reply_queue, item, None))

    async def get(self, queue: str) -> Delivery | None:
        self._check()
        target = self.broker.queues.get(queue)
        if target is not None and target.single_active and target.is_quorum:
            raise ResourceLocked(
                f"RESOURCE_LOCKED - cannot obtain access to locked queue '{queue}'. basic.get "
                "operations are not supported by quorum queues with single active consumer"
            )
        if target is None or not target.ready:
            return None
        item = target.ready.popleft()
        item.deliveries += 1
        target.unacked += 1
        return MemoryDelivery(self.broker, target, item, None)

    async def queue_stats(self, queue: str) -> QueueStats | None:
        self._check()
        target = self.broker.queues.get(queue)
        if target is None:
            return None
        depth = len(target.log) if target.is_stream else len(target.ready)
        return QueueStats(queue, depth, len(target.consumers))

    async def delete_queue(self, queue: str) -> None:
        self._check()
        self.broker.queues.pop(queue, None)
        for bindings in self.broker.bindings.values():
            bindings[:] = [b for b in bindings if b[1] != queue]


def _stream_offset(queue: _Queue, spec: Any) -> int:
    if spec in (None, "next"):
        return len(queue.log)
    if spec == "first":
        return 0
    if spec == "last":
        return max(0, len(queue.log) - 1)
    if isinstance(spec, int):
        return max(0, min(spec, len(queue.log)))
    # A timestamp: the first message the broker took at or after it.
    for index, item in enumerate(queue.log):
        if item.received_at >= spec:
            return index
    return len(queue.log)
