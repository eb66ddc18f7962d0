"""The transport port on RabbitMQ, through aio-pika.

One robust connection, to one of the broker addresses given (the nodes of a
cluster): when that node goes, the connection is restored on the next one. Confirmed
publishes go through one channel with publisher confirms and ``on_return_raises`` (an
unroutable mandatory message is an error, not a silent drop); each consumer gets its
own channel so its prefetch and its failures are its own; requests use RabbitMQ's
direct reply-to on a dedicated channel. aio-pika and aiormq exceptions are converted
to the port's ``TransportError`` tree here, at the boundary. Publishes are written
beneath aio-pika's API, by ``transport._aiormq_publish`` (it says why), the one module
that touches aiormq's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from contracts.topology import ExchangeSpec, QueueSpec
from transport import _aiormq_publish as beneath
from transport.port import (
    DIRECT_REPLY_TO,
    AccessRefused,
    ConfirmTimeout,
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
)

__all__ = [
    "RECONNECT_ERRORS",
    "AmqpTransport",
    "broker_addresses",
    "redact_url",
]

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


# Several addresses in one setting: a comma before the next URL's scheme (a comma
# inside a URL, in a password or a query, is not followed by one).
_ADDRESS_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)")
# A failed connect that another node may not share; an authentication failure is the
# same on every node of a cluster, so it is raised at once.
_TRY_NEXT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    aiormq.exceptions.AMQPConnectionError,
)
_NOT_NEXT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.ConnectionNotAllowed,
)


def broker_addresses(url: str | Sequence[str]) -> list[str]:
    """The broker addresses of a setting: one AMQP URL, several separated by commas
    (``amqp://u:p@n1:5672/,amqp://u:p@n2:5672/``), or a sequence of URLs."""
    given = [url] if isinstance(url, str) else list(url)
    addresses = [a for item in given for a in _ADDRESS_SEPARATOR.split(item.strip()) if a]
    if not addresses:
        raise ValueError("no broker address given")
    return addresses


def redact_url(url: str | Sequence[str]) -> str:
    """The URL (or each of several) with its password hidden, for messages and logs."""
    addresses = broker_addresses(url)
    if len(addresses) > 1:
        return ",".join(redact_url(address) for address in addresses)
    parts = urllib.parse.urlsplit(addresses[0])
    if parts.password:
        return urllib.parse.urlunsplit(
            parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
        )
    return addresses[0]


class _NextAddress:
    """A robust connection's close callback that points it at the next address.

    aio-pika calls a connection's close callbacks when an open connection is lost and
    when a reconnect attempt fails, each time before its next attempt, and every
    attempt connects to the connection's ``url``: so the attempts go round the
    addresses, one per ``reconnect_interval``, until a node answers. The channels,
    queues and consumers are restored on whichever node that is (a quorum queue or a
    stream is reachable from every node of its cluster).
    """

    def __init__(self, addresses: Sequence[str], current: int) -> None:
        self._addresses = [URL(address) for address in addresses]
        self._current = current
        self._left: object = None  # the underlying connection last moved away from

    def __call__(self, connection: object, exc: BaseException | None = None) -> None:
        if len(self._addresses) < 2 or not isinstance(connection, aio_pika.RobustConnection):
            return
        if connection.close_called:
            return  # closed on purpose: no next attempt
        # A connection made whose restore then failed reports its close twice (once
        # for the restore, once as the socket closes): move on once, not skip a node.
        if connection.transport is not None:
            if connection.transport is self._left:
                return
            self._left = connection.transport
        self._current = (self._current + 1) % len(self._addresses)
        connection.url = self._addresses[self._current]
        log.info(
            "connection to %s lost or refused (%s); next attempt: %s",
            redact_url(str(self._addresses[self._current - 1])),
            exc,
            redact_url(str(connection.url)),
        )


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
    except aiormq.exceptions.ChannelLockedResource as exc:
        # An exclusive or single-active-consumer queue of another connection; the
        # broker closed the channel over this one operation, the connection is fine.
        raise ResourceLocked(f"{what}: refused by the broker ({exc})") from exc
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        # A missing queue or exchange: as above, only the channel is closed.
        raise TransportError(f"{what}: refused by the broker ({exc})") from exc
    except _LOST as exc:
        raise TransportError(f"{what}: connection lost ({type(exc).__name__}: {exc})") from exc
    except aiormq.exceptions.AMQPError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _underlying(connection: AbstractRobustConnection) -> object:
    """aiormq's connection under a robust one now (None while there is none)."""
    transport = connection.transport
    return None if transport is None else transport.connection


def _is_open(channel: AbstractChannel) -> bool:
    """Whether the channel is open now (a call, so that a type checker does not carry
    one reading of it across an ``await``)."""
    return not channel.is_closed


class _Restored:
    """Whether a robust channel has been restored whole: reopened *and* its queues and
    consumers declared again.

    aio-pika reports a reopened channel as open as soon as the broker opened it, and
    only then re-declares its queues and re-registers its consumers. A request sent in
    that gap, on the channel that consumes direct reply-to, reaches the broker before
    the reply consumer does: the broker closes the channel (``PRECONDITION_FAILED - fast
    reply consumer does not exist``), and the next frame written for the old channel
    number closes the whole connection (``expected 'channel.open'``), so the restore
    starts again. The channel's own callbacks say when the gap begins (closed) and ends
    (reopened: aio-pika calls them after the re-declarations).
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self.whole = True
        if isinstance(channel, AbstractRobustChannel):
            channel.close_callbacks.add(self._closed)
            channel.reopen_callbacks.add(self._reopened)

    def _closed(self, *_: object) -> None:
        self.whole = False

    def _reopened(self, *_: object) -> None:
        self.whole = True


class _Acks:
    """The acks of one consumer channel, sent together once per pass of the event loop.

    Handlers finish many deliveries per pass (a group commit answers a whole batch of
    commands at once), and one ack frame each is a good share of a consumer's and the
    broker's work. So an ack only marks its delivery done; a flush at the end of the
    pass sends one ``multiple`` ack for the oldest unbroken run of done deliveries and
    single acks for done ones behind a delivery still being handled (never delaying
    them). A delivery that is requeued or rejected stays open until its own frame is
    queued, so no ``multiple`` ack can cover it first.
    """

    def __init__(self, delay: float = 0.0, *, enough: int = 1) -> None:
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._open: dict[int, bool] = {}  # delivery tag → done; arrival (tag) order
        self._flushing = False
        self._lock = asyncio.Lock()
        # ``delay``: a flush waits this long for more acks, unless ``enough`` are done
        # (a consumer whose messages come one per pass would send an ack frame each).
        self._delay = delay
        self._enough = enough
        self._done = 0
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, message: AbstractIncomingMessage) -> None:
        if message.channel is not self._channel:
            # A new channel after a reconnect: the old one's tags mean nothing now
            # (the broker redelivers what they named).
            self._channel = message.channel
            self._open.clear()
        if message.delivery_tag is not None:
            self._open[message.delivery_tag] = False

    def done(self, message: AbstractIncomingMessage) -> None:
        tag = message.delivery_tag
        if message.channel is not self._channel or tag not in self._open:
            return
        self._open[tag] = True
        self._done += 1
        if self._flushing:
            if self._timer is not None and self._done >= self._enough:
                self._timer.cancel()  # enough waiting: now, not when the delay is up
                self._timer = None
                asyncio.get_running_loop().call_soon(self._flush_soon)
            return
        self._flushing = True
        loop = asyncio.get_running_loop()
        if self._delay > 0 and self._done < self._enough:
            self._timer = loop.call_later(self._delay, self._flush_soon)
        else:
            loop.call_soon(self._flush_soon)

    def forget(self, message: AbstractIncomingMessage) -> None:
        """Settled otherwise (its nack or reject is already queued)."""
        if message.channel is self._channel and message.delivery_tag is not None:
            self._open.pop(message.delivery_tag, None)

    def _flush_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.flush())
        task.add_done_callback(_log_flush_failure)

    async def flush(self) -> None:
        # One flush at a time, in order: the acks of a flush waiting for room on the
        # connection's write queue must not be overtaken by a later flush's ``multiple``
        # ack (the broker refuses to ack a tag twice, and closes the channel).
        async with self._lock:
            self._flushing = False
            self._done = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            channel = self._channel
            if channel is None:
                return
            last: int | None = None
            while self._open:
                tag, done = next(iter(self._open.items()))
                if not done:
                    break
                del self._open[tag]
                last = tag
            single = [tag for tag, done in self._open.items() if done]
            for tag in single:
                del self._open[tag]
            if channel.is_closed or (last is None and not single):
                return  # the broker requeues them; the redeliveries are deduplicated
            # Under the lock, so bounded by the channel's life: a flush stuck for ever
            # would hold back every later flush, and the consumer's next channel would
            # stop receiving once its prefetch is used up (see ``_unless_closed``).
            await _unless_closed(channel, _send_acks(channel, last, single))


async def _send_acks(
    channel: aiormq.abc.AbstractChannel, last: int | None, single: list[int]
) -> None:
    if last is not None:
        await channel.basic_ack(last, multiple=True, wait=False)
    for tag in single:
        await channel.basic_ack(tag, wait=False)


async def _unless_closed(channel: aiormq.abc.AbstractChannel, write: Awaitable[None]) -> bool:
    """Run ``write`` (frames put on the connection's write queue) unless the channel
    closes first; whether it ran to the end.

    aiormq's write queue holds a handful of frames, and a put waits for room. When the
    connection is lost the writer stops taking frames and nothing wakes a put that is
    waiting: without this it would wait for ever. That is what happened to a
    consumer's acks when the broker was stopped while the queue was full: the flush
    kept its lock for good, the restored consumer's acks waited behind it, and the
    broker, the consumer's prefetch used up, delivered nothing more (the coordinator
    answered no command after a restart, its commands consumer holding 256 unacked).

    ``write`` runs in the calling task (no task of its own, so frames keep their order
    with the caller's other writes); the channel's closing cancels it.
    """
    task = asyncio.current_task()
    closing = channel.closing
    writing = True
    stopped = False

    def on_closing(_: object) -> None:
        nonlocal stopped
        if writing and task is not None:
            stopped = True
            task.cancel()

    closing.add_done_callback(on_closing)
    try:
        await write
    except asyncio.CancelledError:
        if not stopped:
            raise
        assert task is not None
        if task.uncancel() > 0:
            raise  # cancelled by someone else as well
        return False
    finally:
        writing = False
        closing.remove_done_callback(on_closing)
        closing.cancel()  # an observer of its own (or already done): nobody else is told
    return True


def _log_flush_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # A lost channel: the broker redelivers what was not acked.
        log.debug("acks not sent: %s", task.exception())


class AmqpDelivery(Delivery):
    def __init__(
        self, message: AbstractIncomingMessage, *, no_ack: bool = False, acks: _Acks | None = None
    ) -> None:
        self._message = message
        self._settled = no_ack
        self._acks = acks
        if acks is not None and not no_ack:
            acks.opened(message)
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
        if self._acks is not None:
            self._acks.done(self._message)
            return
        with _mapped("ack"):
            await self._message.ack()

    async def requeue(self) -> None:
        self._take()
        with _mapped("requeue"):
            await self._message.nack(requeue=True)
        # Only now, its frame queued: a nack that failed or was cancelled left the
        # delivery outstanding, and dropping its tag would let the next ``multiple``
        # ack acknowledge it unhandled. Kept open, it holds ``multiple`` acks back
        # until its channel goes, and the broker redelivers it then.
        if self._acks is not None:
            self._acks.forget(self._message)

    async def reject(self) -> None:
        self._take()
        with _mapped("reject"):
            await self._message.reject(requeue=False)
        if self._acks is not None:  # as in ``requeue``: only once its frame is queued
            self._acks.forget(self._message)


class _AmqpConsumerHandle(ConsumerHandle):
    def __init__(
        self, channel: AbstractChannel, queue: AbstractQueue, tag: str, acks: _Acks
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._tag: str | None = tag
        self._acks = acks

    async def cancel(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None:
            with contextlib.suppress(*_CHANNEL_ERRORS):
                await self._queue.cancel(tag)

    async def close(self) -> None:
        """Cancel, send the acks still waiting, then close the channel: the broker
        requeues what is unsettled."""
        await self.cancel()
        with contextlib.suppress(*_CHANNEL_ERRORS):
            await self._acks.flush()
            await self._channel.close()


class AmqpTransport(Transport):
    """A robust connection to RabbitMQ: ``url`` is one AMQP URL, several separated by
    commas, or a sequence of them (the nodes of one cluster). The first that answers is
    used; when its node goes, the connection and everything on it are restored on the
    next address that answers."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        connection_name: str = "sessionbus",
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        restore_timeout: float = 15.0,
        reconnect_interval: float = 1.0,
        confirm_timeout: float = 30.0,
    ) -> None:
        self.addresses = broker_addresses(url)
        self.url = ",".join(self.addresses)
        self.restore_timeout = restore_timeout
        # The longest a confirmed publish waits for room on the connection and for the
        # broker's confirms, before ``ConfirmTimeout``.
        self.confirm_timeout = confirm_timeout
        self.reconnect_interval = reconnect_interval
        self.connection_name = connection_name
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        parts = urllib.parse.urlsplit(self.addresses[0])
        self.user = urllib.parse.unquote(parts.username or "guest")
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._send_channel: AbstractChannel | None = None
        self._publish_restored: _Restored | None = None
        self._send_restored: _Restored | None = None
        # The broker connection (aiormq's) that publishes went out on last, to count a
        # new one as soon as anything is published on it (see ``_connection_seen``).
        self._underlying: object = None
        self._consumers: list[_AmqpConsumerHandle] = []
        self._waiting: dict[str, asyncio.Future[Delivery]] = {}
        self._reply_consumer: str | None = None
        self._reply_lock = asyncio.Lock()
        self._closed = False
        self.reconnects = 0
        # Exclusive queues declared here, by name: consumed, they are declared again
        # on a restored connection (see ``consume``).
        self._exclusive: dict[str, QueueSpec] = {}
        self._reconnect_callbacks: list[ReconnectCallback] = []
        self._callback_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"AmqpTransport({redact_url(self.url)!r}, user={self.user!r})"

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportClosed("transport is not connected")
        return self._connection

    @property
    def address(self) -> str | None:
        """The address the connection uses now (or tries next while it is restored)."""
        if not isinstance(self._connection, aio_pika.RobustConnection):
            return None
        return str(self._connection.url)

    async def connect(self) -> None:
        token = _connecting.set(True)
        try:
            await self._connect()
        finally:
            _connecting.reset(token)

    async def _connect(self) -> None:
        failures: list[str] = []
        for index, address in enumerate(self.addresses):
            where = f"connect to {redact_url(address)}"
            try:
                connection = await aio_pika.connect_robust(
                    address,
                    client_properties={"connection_name": self.connection_name},
                    timeout=self.connect_timeout,
                    ssl_context=self.ssl_context,
                    reconnect_interval=self.reconnect_interval,
                )
            except _NOT_NEXT as exc:
                raise AccessRefused(f"{where}: {exc}") from exc
            except _TRY_NEXT as exc:
                failures.append(f"{redact_url(address)}: {exc or type(exc).__name__}")
                continue
            connection.close_callbacks.add(_NextAddress(self.addresses, index))
            connection.reconnect_callbacks.add(self._on_reconnect)
            self._connection = connection
            with _mapped(where):
                self._publish_channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._send_channel = await connection.channel(publisher_confirms=False)
            self._publish_restored = _Restored(self._publish_channel)
            self._send_restored = _Restored(self._send_channel)
            self._underlying = _underlying(connection)
            return
        raise TransportError(f"cannot reach RabbitMQ at {'; '.join(failures)}")

    def _on_reconnect(self, *_: object) -> None:
        if self._connection is not None:
            self._connection_seen(_underlying(self._connection))
        log.info(
            "connection restored on %s (%d)", redact_url(self.address or self.url), self.reconnects
        )
        if self._closed:
            return
        # aio-pika calls this once every channel is restored (consumers included);
        # the callbacks run as tasks of their own so that a slow one does not hold up
        # aio-pika's restore of the next connection should this one go too.
        for callback in list(self._reconnect_callbacks):
            task = asyncio.get_running_loop().create_task(self._reconnected(callback))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    async def _reconnected(self, callback: ReconnectCallback) -> None:
        try:
            await callback()
        except Exception:
            log.exception("reconnect callback %r failed", callback)

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        self._reconnect_callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._reconnect_callbacks.remove(callback)

        return remove

    def _connection_seen(self, underlying: object) -> None:
        """Count a broker connection other than the last one seen as a reconnect.

        aio-pika calls its reconnect callbacks only once every channel of a new
        connection has been restored, and not at all for a connection whose restore
        then failed (a queue not back yet after a broker restart: it closes that
        connection and tries again). Channels restored before the failure are used in
        the meantime, so a publish can go out on a connection that was never reported.
        Counting it when its first publish leaves lets ``reconnects`` readers (the
        relay's re-publishing after a reconnect) see every such connection.
        """
        if underlying is not None and underlying is not self._underlying:
            self._underlying = underlying
            self.reconnects += 1

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._callback_tasks):
            task.cancel()
        await asyncio.gather(*self._callback_tasks, return_exceptions=True)
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
        if spec.exclusive:
            self._exclusive[spec.name] = spec

    async def _ready(
        self, channel: AbstractChannel | None, restored: _Restored | None
    ) -> AbstractChannel:
        """A channel that is open and restored whole (see ``_Restored``), waiting
        (bounded) while aio-pika restores it after a lost connection or a channel the
        broker closed (a refused publish)."""
        if self._closed or channel is None or restored is None:
            raise TransportClosed("transport is closed")
        if restored.whole and _is_open(channel):
            return channel
        ready = getattr(channel, "ready", None)
        if ready is None:
            raise TransportError("channel closed")
        # aio-pika reopens a robust channel from its close callback, a task of its own:
        # until that task runs, ``ready()`` still answers for the old channel and returns
        # at once. So wait until the channel is really open again, not just for ready().
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.restore_timeout
        while not (restored.whole and _is_open(channel)):
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
            if not (restored.whole and _is_open(channel)):
                await asyncio.sleep(_RESTORE_PAUSE)
        return channel

    async def _sender(self) -> AbstractChannel:
        return await self._ready(self._send_channel, self._send_restored)

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, mandatory: bool = True
    ) -> None:
        where = f"publish to {exchange or 'the default exchange'} ({routing_key})"
        await self._confirmed(where, exchange, [(routing_key, message)], mandatory)

    async def publish_many(
        self, exchange: str, items: Sequence[tuple[str, OutgoingMessage]]
    ) -> None:
        if items:
            where = f"publish {len(items)} to {exchange or 'the default exchange'}"
            await self._confirmed(where, exchange, items, True)

    async def _confirmed(
        self,
        where: str,
        exchange: str,
        items: Sequence[tuple[str, OutgoingMessage]],
        mandatory: bool,
    ) -> None:
        """Publish and wait for every confirm; raise the first failure (a return or a
        nack fails only its own message). The wait is bounded by ``confirm_timeout``:
        past it, ``ConfirmTimeout`` (retryable) — the caller publishes again, as the
        relay does from its unmoved position; a confirm arriving later is dropped."""
        with _mapped(where):
            channel = await self._ready(self._publish_channel, self._publish_restored)
            underlay = await beneath.underlay(channel)
            self._connection_seen(underlay.connection)
            # One deadline for the batch, not a timer per message: a relay page is
            # hundreds of messages.
            deadline = asyncio.get_running_loop().time() + self.confirm_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    batch = await beneath.publish_confirmed(underlay, exchange, items, mandatory)
            except TimeoutError as exc:
                raise ConfirmTimeout(
                    f"{where}: no room on the connection within {self.confirm_timeout} s"
                ) from exc
            failure: Exception | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    for future in batch.futures:
                        try:
                            await future
                        except Exception as exc:  # noqa: BLE001 (the first is raised below)
                            failure = failure or exc
            except TimeoutError as exc:
                late = ConfirmTimeout(f"{where}: not confirmed within {self.confirm_timeout} s")
                late.__cause__ = exc
                failure = failure or late
            finally:
                batch.forget()
            if failure is not None:
                raise failure

    async def send(self, routing_key: str, message: OutgoingMessage) -> None:
        with _mapped(f"send to {routing_key}"):
            channel = await self._sender()
            underlay = await beneath.underlay(channel)
            # Not mandatory: a reply to a client that has gone must not come back as a
            # return. Not waiting for the socket write either: frames leave in order,
            # so a reply is always written before the ack that follows it.
            await beneath.send_now(underlay, routing_key, message.body, beneath.properties(message))

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int = 64,
        arguments: Mapping[str, Any] | None = None,
        ack_delay: float = 0.0,
    ) -> ConsumerHandle:
        with _mapped(f"consume {queue}"):
            channel = await self.connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            spec = self._exclusive.get(queue)
            if spec is None:
                # A passive declare (not get_queue) registers the queue with the robust
                # channel, which re-consumes after a reconnect.
                target = await channel.declare_queue(queue, passive=True)
            else:
                # An exclusive queue went with the lost connection: a passive declare
                # would fail aio-pika's restore of the whole connection, again and
                # again. Declared in full and bound here, the robust channel declares
                # and binds it again before it consumes.
                target = await channel.declare_queue(
                    queue,
                    durable=spec.durable,
                    exclusive=True,
                    auto_delete=spec.auto_delete,
                    arguments=dict(spec.arguments) or None,
                )
                for exchange, key in spec.bindings:
                    await target.bind(exchange, routing_key=key)

            acks = _Acks(ack_delay, enough=max(1, prefetch // 2))

            async def on_message(message: AbstractIncomingMessage) -> None:
                await handler(AmqpDelivery(message, acks=acks))

            tag = await target.consume(on_message, arguments=dict(arguments or {}) or None)
        handle = _AmqpConsumerHandle(channel, target, tag, acks)
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
                underlay = await beneath.underlay(channel)
                # Direct reply-to: the request must leave on the channel that consumes
                # the pseudo-queue.
                properties = beneath.properties(message)
                properties.reply_to = DIRECT_REPLY_TO
                # The send inside the timeout too: a send waiting for room on a
                # connection that is then lost would otherwise wait for ever (see
                # ``_unless_closed``); a request that times out is retried.
                async with asyncio.timeout(timeout):
                    await beneath.send_now(underlay, queue, message.body, properties)
                    return await future
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
        except aiormq.exceptions.ChannelLockedResource as exc:
            raise ResourceLocked(f"inspect queue {queue}: {exc}") from exc
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
        self._exclusive.pop(queue, None)


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
