"""The live feed: session events as they are published, for the pages' server-sent events.

The console consumes the events exchange through a queue of its own,
``<prefix>.console.<random>``: exclusive to its connection and deleted with it, so a
console that stops leaves nothing behind, and bounded (the oldest events are dropped
when nobody keeps up). Each event becomes a small summary (which session, what
happened, the version and the status it led to) handed to every open page's stream;
a page that falls behind loses summaries, not the console's memory, and is told so.
The pages read the sessions themselves through the signed-in person's own client.

The queue goes with a lost broker connection, and what is published until the
transport has restored it (declared, bound and consumed again: ``Transport.
declare_queue``) never reaches it: each open page is then told to read its view again
(``resync``), rather than go on with a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from contracts import (
    DecodeError,
    Destroyed,
    ErrorReported,
    EventEnvelope,
    SessionCreated,
    StatusChanged,
    Topology,
    codec_for,
)
from contracts.topology import QueueSpec
from transport.port import ConsumerHandle, Delivery, Transport, TransportError

__all__ = ["LiveFeed", "Subscriber", "summary"]

log = logging.getLogger("sessionbus.console.feed")

# Summaries a page's stream holds before it is marked as having missed some.
PER_PAGE = 1000
# Events the console's queue holds while the console is slow (then the oldest go).
QUEUE_LENGTH = 10_000
# Seconds the feed's acks wait to go out together (see ``LiveFeed.follow``).
FEED_ACK_DELAY = 0.05
# Seconds with no page watching after which the feed stops following the events (a
# person moving between pages keeps it going).
IDLE_SECONDS = 30.0


def summary(env: EventEnvelope) -> dict[str, Any]:
    """What a page needs to know of one event: which session, what, when, and the status
    it set (when it set one)."""
    event = env.event
    out: dict[str, Any] = {
        "session_id": str(env.session_id),
        "type": env.type,
        "version": env.version,
        "at": env.occurred_at.isoformat(),
        "actor": env.actor,
    }
    if isinstance(event, StatusChanged):
        # The workflow session's status, or that of one module's session.
        out["module_status" if event.module_id else "status"] = event.new_status.value
        if event.error is not None:
            out["error"] = str(event.error.code)
    elif isinstance(event, SessionCreated):
        out["status"] = "INITIALIZING"
        out["created_at"] = env.occurred_at.isoformat()
    elif isinstance(event, Destroyed):
        out["destroyed"] = True
    elif isinstance(event, ErrorReported):
        out["error"] = str(event.error.code)
    module_id = getattr(event, "module_id", None)
    if module_id is not None:
        out["module_id"] = module_id
    return out


@dataclass(eq=False)  # each one is itself (hashed by identity, kept in a set)
class Subscriber:
    """One page's stream: ``(event, data)`` items (``session`` summaries, ``resync``)."""

    queue: asyncio.Queue[tuple[str, dict[str, Any]]]
    missed: int = 0
    # A resync that found the queue full: sent before the next item.
    resync: dict[str, Any] | None = None


class LiveFeed:
    """One consumer of the events exchange, fanned out to every open page; it follows
    the events while some page watches (and ``idle_seconds`` after the last closed)."""

    def __init__(
        self,
        transport: Transport,
        topology: Topology,
        *,
        own_transport: bool,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.transport = transport
        self.topology = topology
        self.own_transport = own_transport
        self.queue_name = topology.console_queue_for(uuid.uuid4().hex[:12])
        self.running = False
        self.problem: str | None = None
        self.received = 0
        self.resyncs = 0
        self._subscribers: set[Subscriber] = set()
        self._handle: ConsumerHandle | None = None
        self._unhook: Callable[[], None] | None = None
        # Nobody watching for this long: the feed stops following the events (a
        # console nobody looks at costs the broker and itself nothing per event; under
        # ``--console-port`` that is the coordinator's own process).
        self.idle_seconds = idle_seconds
        self._idle: asyncio.TimerHandle | None = None
        self._following = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Declare the console's queue and consume it (and stop again once no page has
        watched for ``idle_seconds``). A broker that refuses (this user may not declare
        queues) leaves the console without live updates, said on the pages, rather
        than without a console."""
        try:
            if self.own_transport:
                await self.transport.connect()
            await self.follow()
            self._unhook = self.transport.on_reconnect(self._on_reconnect)
        except (TransportError, OSError) as exc:
            self.problem = f"live updates are off: {exc}"
            log.warning("console: %s", self.problem)
            return
        self.running = True
        self._idle_soon()

    async def follow(self) -> None:
        """Declare, bind and consume the console's queue (unless it is)."""
        async with self._following:
            if self._handle is not None:
                return
            await self.transport.declare_queue(
                QueueSpec(
                    self.queue_name,
                    durable=False,
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-max-length": QUEUE_LENGTH, "x-overflow": "drop-head"},
                    bindings=[(self.topology.events_exchange, "session.#")],
                )
            )
            # Events come one at a time, up to thousands a second: their acks go
            # together every FEED_ACK_DELAY rather than a frame each (a lost connection
            # takes the queue with it, so nothing is redelivered anyway).
            self._handle = await self.transport.consume(
                self.queue_name, self._on_delivery, prefetch=256, ack_delay=FEED_ACK_DELAY
            )

    async def _unfollow(self) -> None:
        """Stop consuming and delete the queue: the broker routes nothing to it."""
        async with self._following:
            handle, self._handle = self._handle, None
            if handle is None:
                return
            with contextlib.suppress(TransportError, OSError):
                await handle.close()
            with contextlib.suppress(TransportError, OSError):
                await self.transport.delete_queue(self.queue_name)

    @property
    def following(self) -> bool:
        """Whether the feed consumes the events now (some page watched lately)."""
        return self._handle is not None

    def _idle_soon(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.idle_seconds, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        if not self._subscribers and self.running:
            task = asyncio.get_running_loop().create_task(self._unfollow())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self.running = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        if self._handle is not None:
            with contextlib.suppress(Exception):
                await self._handle.close()
            self._handle = None
        if self.own_transport:
            with contextlib.suppress(Exception):
                await self.transport.close()

    async def _on_delivery(self, delivery: Delivery) -> None:
        await delivery.ack()
        try:
            env = codec_for(delivery.content_type).decode_envelope(delivery.body)
        except DecodeError:
            return  # not ours to judge here; the modules dead-letter what they cannot read
        self.received += 1
        item = summary(env)
        for subscriber in self._subscribers:
            try:
                subscriber.queue.put_nowait(("session", item))
            except asyncio.QueueFull:
                subscriber.missed += 1

    async def _on_reconnect(self) -> None:
        """The connection was lost and restored, the queue consumed again: every open
        page may have missed events and reads its view again."""
        self.resyncs += 1
        log.warning(
            "console: broker connection restored (%d), live updates go on; open pages "
            "are told to read their view again",
            self.transport.reconnects,
        )
        data = {"queue": self.queue_name, "reconnects": self.transport.reconnects}
        for subscriber in self._subscribers:
            try:
                subscriber.queue.put_nowait(("resync", data))
            except asyncio.QueueFull:
                subscriber.resync = data

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscriber]:
        """A stream of summaries for one page, from now until the block ends (the feed
        follows the events again first, if no page watched for a while; raises
        ``TransportError`` when it cannot)."""
        subscriber = Subscriber(asyncio.Queue(PER_PAGE))
        self._subscribers.add(subscriber)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            await self.follow()
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)
            if not self._subscribers and self.running:
                self._idle_soon()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
