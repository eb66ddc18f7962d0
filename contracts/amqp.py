"""The transport port on RabbitMQ, through aio-pika.

One robust connection. Confirmed publishes go through one channel with publisher
confirms and ``on_return_raises`` (an unroutable mandatory message is an error, not a
silent drop); each consumer gets its own channel so its prefetch and its failures are
its own; requests use RabbitMQ's direct reply-to on a dedicated channel. aio-pika and
aiormq exceptions are converted to the port's ``TransportError`` tree here, at the
boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from datetime import UTC
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from contracts.transport import (
    DIRECT_REPLY_TO,
    AccessRefused,
    ConsumerHandle,
    Delivery,
    ExchangeSpec,
    Handler,
    OutgoingMessage,
    QueueSpec,
    QueueStats,
    Transport,
    TransportClosed,
    TransportError,
    Unroutable,
)

__all__ = ["RECONNECT_ERRORS", "AmqpTransport", "redact_url"]

log = logging.getLogger("sessionbus.amqp")

# The failures that mean "the connection or channel went away": retry after reconnect.
RECONNECT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    asyncio.IncompleteReadError,
)
# aio-pika raises RuntimeError("... closed") while a robust connection is restored.
_LOST: tuple[type[BaseException], ...] = (*RECONNECT_ERRORS, RuntimeError)
_CHANNEL_ERRORS: tuple[type[BaseException], ...] = (*RECONNECT_ERRORS, aiormq.exceptions.AMQPError)
# How long to give aio-pika's close callback before looking at a closed channel again.
_RESTORE_PAUSE = 0.01


_connecting: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sessionbus_amqp_connecting", default=False
)


class _FirstConnectFilter(logging.Filter):
    """aiormq logs a failed first connect at ERROR; ``connect`` raises it as one clear
    TransportError, so the log line would only say it twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _connecting.get()


logging.getLogger("aiormq.connection").addFilter(_FirstConnectFilter())


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return urllib.parse.urlunsplit(
            parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
        )
    return url


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Convert broker-library exceptions into the port's tree."""
    try:
        yield
    except aiormq.exceptions.PublishError as exc:
        raise Unroutable(f"{what}: unroutable ({exc})") from exc
    except (
        aiormq.exceptions.ChannelAccessRefused,
        aiormq.exceptions.ChannelPreconditionFailed,
        aiormq.exceptions.ProbableAuthenticationError,
    ) as exc:
        raise AccessRefused(f"{what}: {exc}") from exc
    except aiormq.exceptions.DeliveryError as exc:
        raise TransportError(f"{what}: the broker did not accept the message ({exc})") from exc
    except (
        aiormq.exceptions.ChannelNotFoundEntity,
        aiormq.exceptions.ChannelLockedResource,
    ) as exc:
        # The broker closed the channel over this one operation (a missing queue or
        # exchange, an exclusive or single-active-consumer queue); the connection is fine.
        raise TransportError(f"{what}: refused by the broker ({exc})") from exc
    except _LOST as exc:
        raise TransportError(f"{what}: connection lost ({type(exc).__name__}: {exc})") from exc
    except aiormq.exceptions.AMQPError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _is_open(channel: AbstractChannel) -> bool:
    """Whether the channel is open now (a call, so that a type checker does not carry
    one reading of it across an ``await``)."""
    return not channel.is_closed


class AmqpDelivery(Delivery):
    def __init__(self, message: AbstractIncomingMessage, *, no_ack: bool = False) -> None:
        self._message = message
        self._settled = no_ack
        self.body = message.body
        self.routing_key = message.routing_key or ""
        self.exchange = message.exchange or ""
        self.content_type = message.content_type
        self.headers = dict(message.headers or {})
        self.message_id = message.message_id
        self.correlation_id = message.correlation_id
        self.reply_to = message.reply_to
        self.type = message.type
        self.user_id = message.user_id
        self.redelivered = bool(message.redelivered)

    @property
    def settled(self) -> bool:
        return self._settled

    def _take(self) -> None:
        if self._settled:
            raise TransportError("delivery already settled")
        self._settled = True

    async def ack(self) -> None:
        self._take()
        with _mapped("ack"):
            await self._message.ack()

    async def requeue(self) -> None:
        self._take()
        with _mapped("requeue"):
            await self._message.nack(requeue=True)

    async def reject(self) -> None:
        self._take()
        with _mapped("reject"):
            await self._message.reject(requeue=False)


class _AmqpConsumerHandle(ConsumerHandle):
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, tag: str) -> None:
        self._channel = channel
        self._queue = queue
        self._tag: str | None = tag

    async def cancel(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None:
            with contextlib.suppress(*_CHANNEL_ERRORS):
                await self._queue.cancel(tag)

    async def close(self) -> None:
        """Cancel, then close the channel: the broker requeues what is unsettled."""
        await self.cancel()
        with contextlib.suppress(*_CHANNEL_ERRORS):
            await self._channel.close()


def _properties(message: OutgoingMessage) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        content_type=message.content_type,
        headers=dict(message.headers) if message.headers else None,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        type=message.type,
        user_id=message.user_id,
        timestamp=message.timestamp.astimezone(UTC) if message.timestamp else None,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT
            if message.persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
        expiration=message.expiration_ms / 1000 if message.expiration_ms else None,
    )


class AmqpTransport(Transport):
    """A robust connection to RabbitMQ."""

    def __init__(
        self,
        url: str,
        *,
        connection_name: str = "sessionbus",
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        restore_timeout: float = 15.0,
        reconnect_interval: float = 1.0,
    ) -> None:
        self.url = url
        self.restore_timeout = restore_timeout
        self.reconnect_interval = reconnect_interval
        self.connection_name = connection_name
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        parts = urllib.parse.urlsplit(url)
        self.user = urllib.parse.unquote(parts.username or "guest")
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._send_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consumers: list[_AmqpConsumerHandle] = []
        self._waiting: dict[str, asyncio.Future[Delivery]] = {}
        self._reply_consumer: str | None = None
        self._reply_lock = asyncio.Lock()
        self._closed = False
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"AmqpTransport({redact_url(self.url)!r}, user={self.user!r})"

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportClosed("transport is not connected")
        return self._connection

    async def connect(self) -> None:
        token = _connecting.set(True)
        try:
            await self._connect()
        finally:
            _connecting.reset(token)

    async def _connect(self) -> None:
        with _mapped(f"connect to {redact_url(self.url)}"):
            try:
                self._connection = await aio_pika.connect_robust(
                    self.url,
                    client_properties={"connection_name": self.connection_name},
                    timeout=self.connect_timeout,
                    ssl_context=self.ssl_context,
                    reconnect_interval=self.reconnect_interval,
                )
            except (OSError, TimeoutError) as exc:
                raise TransportError(
                    f"cannot reach RabbitMQ at {redact_url(self.url)}: {exc}"
                ) from exc
            self._connection.reconnect_callbacks.add(self._on_reconnect)
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._send_channel = await self._connection.channel(publisher_confirms=False)

    def _on_reconnect(self, *_: object) -> None:
        self.reconnects += 1
        log.info("connection to %s restored (%d)", redact_url(self.url), self.reconnects)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._consumers:
            await handle.cancel()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(TransportClosed("transport closed"))
        if self._connection is not None:
            with contextlib.suppress(*_CHANNEL_ERRORS):
                await asyncio.wait_for(self._connection.close(), 10)

    async def _admin_channel(self) -> AbstractChannel:
        """A short-lived channel for declarations: a failed declare closes its channel,
        and that must not take the publishing channel with it."""
        return await self.connection.channel(publisher_confirms=False)

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        with _mapped(f"declare exchange {spec.name}"):
            channel = await self._admin_channel()
            async with channel:
                await channel.declare_exchange(
                    spec.name,
                    aio_pika.ExchangeType(spec.type),
                    durable=spec.durable,
                    arguments=dict(spec.arguments) or None,
                )

    async def declare_queue(self, spec: QueueSpec) -> None:
        with _mapped(f"declare queue {spec.name}"):
            channel = await self._admin_channel()
            async with channel:
                queue = await channel.declare_queue(
                    spec.name,
                    durable=spec.durable,
                    exclusive=spec.exclusive,
                    auto_delete=spec.auto_delete,
                    arguments=dict(spec.arguments) or None,
                )
                for exchange, key in spec.bindings:
                    await queue.bind(exchange, routing_key=key)

    async def _ready(self, channel: AbstractChannel | None) -> AbstractChannel:
        """A channel that is open, waiting (bounded) while aio-pika restores it after a
        lost connection or a channel the broker closed (a refused publish)."""
        if self._closed or channel is None:
            raise TransportClosed("transport is closed")
        if _is_open(channel):
            return channel
        ready = getattr(channel, "ready", None)
        if ready is None:
            raise TransportError("channel closed")
        # aio-pika reopens a robust channel from its close callback, a task of its own:
        # until that task runs, ``ready()`` still answers for the old channel and returns
        # at once. So wait until the channel is really open again, not just for ready().
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.restore_timeout
        while not _is_open(channel):
            if self._closed:
                raise TransportClosed("transport is closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransportError(
                    f"broker connection not restored within {self.restore_timeout} s"
                )
            try:
                await asyncio.wait_for(ready(), remaining)
            except TimeoutError:
                continue  # the next pass reports it
            if not _is_open(channel):
                await asyncio.sleep(_RESTORE_PAUSE)
        return channel

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = await self._ready(self._publish_channel)
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def _sender(self) -> AbstractChannel:
        return await self._ready(self._send_channel)

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, mandatory: bool = True
    ) -> None:
        with _mapped(f"publish to {exchange or 'the default exchange'} ({routing_key})"):
            target = await self._exchange(exchange)
            await target.publish(_properties(message), routing_key, mandatory=mandatory)

    async def send(self, routing_key: str, message: OutgoingMessage) -> None:
        with _mapped(f"send to {routing_key}"):
            channel = await self._sender()
            # mandatory=False: a reply to a client that has gone must not come back as
            # a return (aio-pika publishes mandatory by default).
            await channel.default_exchange.publish(
                _properties(message), routing_key, mandatory=False
            )

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int = 64,
        arguments: Mapping[str, Any] | None = None,
    ) -> ConsumerHandle:
        with _mapped(f"consume {queue}"):
            channel = await self.connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            # A passive declare (not get_queue) registers the queue with the robust
            # channel, which re-consumes after a reconnect.
            target = await channel.declare_queue(queue, passive=True)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await handler(AmqpDelivery(message))

            tag = await target.consume(on_message, arguments=dict(arguments or {}) or None)
        handle = _AmqpConsumerHandle(channel, target, tag)
        self._consumers.append(handle)
        return handle

    async def _ensure_reply_consumer(self) -> None:
        async with self._reply_lock:
            channel = await self._sender()
            if self._reply_consumer is not None:
                return
            queue = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)

            async def on_reply(message: AbstractIncomingMessage) -> None:
                waiter = self._waiting.get(message.correlation_id or "")
                if waiter is not None and not waiter.done():
                    waiter.set_result(AmqpDelivery(message, no_ack=True))

            self._reply_consumer = await queue.consume(on_reply, no_ack=True)

    async def request(self, queue: str, message: OutgoingMessage, *, timeout: float) -> Delivery:
        if message.correlation_id is None:
            raise ValueError("a request needs a correlation_id")
        with _mapped(f"request to {queue}"):
            await self._ensure_reply_consumer()
            future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
            self._waiting[message.correlation_id] = future
            try:
                channel = await self._sender()
                # Direct reply-to: the request must leave on the channel that consumes
                # the pseudo-queue.
                outgoing = _properties(message)
                outgoing.reply_to = DIRECT_REPLY_TO
                await channel.default_exchange.publish(outgoing, queue, mandatory=False)
                return await asyncio.wait_for(future, timeout)
            finally:
                self._waiting.pop(message.correlation_id, None)

    async def get(self, queue: str) -> Delivery | None:
        with _mapped(f"get from {queue}"):
            channel = await self.connection.channel(publisher_confirms=False)
            target = await channel.get_queue(queue, ensure=False)
            message = await target.get(no_ack=False, fail=False)
            if message is None:
                await channel.close()
                return None
            return _ChannelDelivery(message, channel)

    async def queue_stats(self, queue: str) -> QueueStats | None:
        channel = await self.connection.channel(publisher_confirms=False)
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except _CHANNEL_ERRORS as exc:
            raise TransportError(f"inspect queue {queue}: {exc}") from exc
        finally:
            with contextlib.suppress(*_CHANNEL_ERRORS):
                await channel.close()
        result = declared.declaration_result
        return QueueStats(queue, int(result.message_count or 0), int(result.consumer_count or 0))

    async def delete_queue(self, queue: str) -> None:
        with _mapped(f"delete queue {queue}"):
            channel = await self._admin_channel()
            async with channel:
                await channel.queue_delete(queue)


class _ChannelDelivery(AmqpDelivery):
    """A message taken with basic.get on its own channel, closed once settled."""

    def __init__(self, message: AbstractIncomingMessage, channel: AbstractChannel) -> None:
        super().__init__(message)
        self._channel = channel

    async def _done(self) -> None:
        with contextlib.suppress(*_CHANNEL_ERRORS):
            await self._channel.close()

    async def ack(self) -> None:
        await super().ack()
        await self._done()

    async def requeue(self) -> None:
        await super().requeue()
        await self._done()

    async def reject(self) -> None:
        await super().reject()
        await self._done()
