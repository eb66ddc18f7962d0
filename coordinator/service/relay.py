"""The outbox relay: publishes what the store committed, and only then moves on.

The notification log is the outbox. The relay reads it after its tracked position,
publishes each event to the events exchange with publisher confirms (the whole page
pipelined), and saves the new position only once every confirm is in. A crash between
publish and save re-publishes that page: delivery is at-least-once, and consumers skip
what they already applied by per-session version.

After the broker connection comes back, what the relay publishes in the first moments
is published once more, ``RESEND_AFTER_RECONNECT`` seconds later: RabbitMQ (measured
on 3.10.8, broker restarted with ``stop_app``/``start_app``) confirms messages routed to
a stream queue whose leader has not restarted yet, and drops them from the stream,
while quorum queues keep them. The audit stream must hold every event, so the relay
publishes those again once the stream is back; consumers skip the copies.

What this process commits is handed to the relay with the wake-up (``offer``) and
published from memory when it follows on from the tracked position, saving a read and
a decode of what was just written; anything else (another coordinator's events, a gap,
a backlog after a stall) is read from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

from eventsourcing.persistence import Notification

from contracts import HEADERS, Codec, EventEnvelope, Topology
from coordinator.errors import StoreUnavailable
from coordinator.store.eventstore import EventStore, positioned
from transport.port import OutgoingMessage, Transport, TransportError

__all__ = ["OutboxRelay", "event_message", "relay_checkpoint", "traceparent"]

log = logging.getLogger("sessionbus.coordinator.relay")

# The fall-back only: another coordinator's commits wake the relay too, through this
# coordinator's log follower (woken by the store's notifications on PostgreSQL,
# ``coordinator.store.watch``); without any wake-up, look at the log this often.
POLL_SECONDS: Final = 1.0
MAX_BACKOFF: Final = 5.0
# After a reconnect, publish again what was published since, this much later.
RESEND_AFTER_RECONNECT: Final = 5.0
# Committed events kept for publishing from memory at most; beyond, the log is read.
HANDED_LIMIT: Final = 5_000


def relay_checkpoint(topology: Topology) -> str:
    """The name under which a prefix's relay keeps its position in the store's
    checkpoints: one relay position per prefix, shared by every coordinator on it."""
    return f"relay:{topology.prefix}"


def traceparent(env: EventEnvelope) -> str | None:
    """W3C trace context for an event: the command's correlation id is the trace, the
    event id the span, so every event of one request shares a trace."""
    if env.correlation_id is None:
        return None
    return f"00-{env.correlation_id.hex}-{env.event_id.hex[:16]}-01"


def event_message(
    env: EventEnvelope, codec: Codec, app_id: str = "sessionbus-coordinator"
) -> OutgoingMessage:
    """The AMQP message for one event: message_id is the event id (brokers and
    consumers dedupe on it), persistent, typed, with schema and order in headers."""
    headers: dict[str, object] = {
        HEADERS.SCHEMA_VERSION: env.schema_version,
        HEADERS.SESSION_ID: str(env.session_id),
        HEADERS.VERSION: env.version,
        HEADERS.POSITION: env.position or 0,
    }
    parent = traceparent(env)
    if parent is not None:
        headers[HEADERS.TRACEPARENT] = parent
    return OutgoingMessage(
        body=codec.encode(env),
        content_type=codec.content_type,
        headers=headers,
        message_id=str(env.event_id),
        correlation_id=str(env.correlation_id) if env.correlation_id else None,
        type=env.type,
        timestamp=env.occurred_at,
        persistent=True,
    )


class OutboxRelay:
    """Publishes committed events in store order; at-least-once, never past a gap."""

    def __init__(
        self,
        store: EventStore,
        transport: Transport,
        topology: Topology,
        *,
        codec: Codec | None = None,
        page: int = 500,
        name: str | None = None,
        save_interval: float = 0.25,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        """``fence()``: whether this relay may publish now (the store's leadership lease,
        see ``coordinator.service.leader``); checked before every page."""
        self.store = store
        self.transport = transport
        self.topology = topology
        self.codec = codec or Codec("json")
        self.page = page
        self.checkpoint = name or relay_checkpoint(topology)
        self.position = 0
        self.fence = fence
        self._loaded = asyncio.Event()  # the tracked position was read from the store
        self._store_down = False
        self._save_failing = False
        # The tracked position is saved at most every ``save_interval`` seconds (and on
        # close): a crash re-publishes at most that much, which consumers absorb, and
        # the store is spared a write per page.
        self.save_interval = save_interval
        self._saved_position = 0
        self._saved_at = 0.0
        self._saving = asyncio.Lock()
        self.published = 0
        self.batches = 0
        self._wake = asyncio.Event()
        self._handed: list[EventEnvelope] = []  # committed here, maybe not yet published
        self.from_memory = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._caught_up = asyncio.Event()
        self.resent = 0
        self._reconnects = 0
        self._resend_from: int | None = None  # publish again after this position …
        self._resend_at = 0.0  # … at this time.monotonic()

    async def start(self) -> None:
        """Start publishing from the tracked position (read from the store by the
        relay's task, which waits for a store that is away)."""
        self._reconnects = self.transport.reconnects
        self._task = asyncio.create_task(self._run(), name="sessionbus-relay")
        self.wake()

    async def _load(self) -> None:
        saved = await asyncio.to_thread(self.store.checkpoints.get, self.checkpoint)
        self.position = saved[0] if saved else 0
        self._saved_position = self.position
        self._loaded.set()

    def _may_publish(self) -> bool:
        return self.fence is None or self.fence()

    def wake(self, *_: object) -> None:
        """Something was committed: publish it now (the coordinator's commit hook)."""
        self._caught_up.clear()
        self._wake.set()

    def offer(self, saved: Sequence[EventEnvelope]) -> None:
        """Events this process just committed, with their positions, in store order:
        wake up and publish them, from memory if they follow on from the position."""
        if saved:
            if len(self._handed) + len(saved) > HANDED_LIMIT:
                # Not keeping up (the broker is away): the log has it all anyway.
                self._handed.clear()
            self._handed.extend(saved)
        self.wake()

    def _prune_handed(self) -> list[EventEnvelope]:
        """Drop what the relay's position has passed; the rest."""
        handed = self._handed
        skip = 0
        while skip < len(handed) and (handed[skip].position or 0) <= self.position:
            skip += 1
        if skip:
            del handed[:skip]
        return handed

    def _take_handed(self) -> list[EventEnvelope]:
        """The next page from memory if it continues the log exactly where the relay
        stands (no gap, no one else's events in between); else nothing."""
        handed = self._prune_handed()
        expected = self.position + 1
        taken = 0
        for env in handed:
            if env.position != expected or taken == self.page:
                break
            expected += 1
            taken += 1
        page = handed[:taken]
        if taken == 0 and handed:
            handed.clear()  # not contiguous with the log: read it instead
        return page

    async def close(self) -> None:
        """Publish what is committed (bounded), then stop. Safe to call twice."""
        if self._task is None or self._stopping:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except TimeoutError:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until everything committed so far is published."""
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(self._loaded.wait(), timeout)
        target = await asyncio.to_thread(self.store.max_position)
        while self.position < target:
            self.wake()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"relay at {self.position}, store at {target}")
            try:
                await asyncio.wait_for(self._caught_up.wait(), remaining)
            except TimeoutError:
                continue
        await self._save(force=True)

    async def _run(self) -> None:
        # Not a tenacity retry: this is the relay's service loop, and each pass is the
        # work the latest wake-up (a commit, the poll) brings, not one operation tried
        # again. The backoff only paces the passes while the store or the broker is
        # away, and a pass that succeeds resets it.
        backoff = 0.1
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            self._wake.clear()
            try:
                if not self._loaded.is_set():
                    await self._load()
                await self._drain()
                backoff = 0.1
                if self._store_down:
                    log.warning("relay: the store is back", extra={"position": self.position})
                    self._store_down = False
            except StoreUnavailable as exc:
                if self._stopping:
                    log.warning("relay stopped with the store unavailable: %s", exc)
                    return
                if not self._store_down:  # once per outage
                    log.warning("relay: store unavailable: %s", exc)
                    self._store_down = True
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                self._wake.set()
                continue
            except (TransportError, OSError) as exc:
                log.warning("relay publish failed: %s", exc, extra={"position": self.position})
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                self._wake.set()
                continue
            except Exception:
                log.exception("relay failed", extra={"position": self.position})
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                self._wake.set()
                continue
            if self._resend_from is not None and (
                self._stopping or time.monotonic() >= self._resend_at
            ):
                try:
                    await self._resend()
                except (TransportError, OSError) as exc:
                    log.warning("relay re-publish failed: %s", exc)
                    self._wake.set()
                    continue
            await self._save_or_later()
            if self._stopping:
                return

    async def _save_or_later(self) -> None:
        """Save the position, or leave it to the next wake-up (a commit, or the poll),
        not a retry at once: a full or read-only disk refuses every try while reads,
        and so publishing, still work."""
        try:
            await self._save(force=self._stopping)
        except StoreUnavailable as exc:
            if not self._save_failing:  # once per outage
                log.warning("relay position %d not saved: %s", self.position, exc)
                self._save_failing = True
            return
        if self._save_failing:
            log.warning("relay position saved again at %d", self.position)
            self._save_failing = False

    async def _save(self, *, force: bool) -> None:
        """Persist the tracked position if it moved (throttled unless ``force``)."""
        async with self._saving:  # one write at a time, so the saved value only grows
            if self.position == self._saved_position:
                return
            now = time.monotonic()
            if not force and now - self._saved_at < self.save_interval:
                return
            position = self.position
            # Only ever forward, in SQL: a relay that lost its leadership and saves
            # late cannot move the checkpoint back past the new leader's.
            stored = await asyncio.to_thread(
                self.store.checkpoints.advance, self.checkpoint, position
            )
            if stored > position:
                log.warning(
                    "relay checkpoint at %d, ahead of this relay's %d: another coordinator "
                    "publishes",
                    stored,
                    position,
                )
            self._saved_position = position
            self._saved_at = now

    def _note_reconnect(self, since: int) -> None:
        """If the connection was restored, what was published after ``since`` is to
        be published again (see the module docstring)."""
        if self.transport.reconnects == self._reconnects:
            return
        self._reconnects = self.transport.reconnects
        self._resend_from = since if self._resend_from is None else min(self._resend_from, since)
        self._resend_at = time.monotonic() + RESEND_AFTER_RECONNECT

    async def _resend(self) -> None:
        """Publish again (positions untouched) what was published after a reconnect."""
        assert self._resend_from is not None
        after, until = self._resend_from, self.position
        while after < until and self._may_publish():
            page = await asyncio.to_thread(self.store.read_notifications, after, self.page)
            notifications = [n for n in page if n.id <= until]
            if not notifications:
                break
            await self.transport.publish_many(
                self.topology.events_exchange, self._messages(self._decoded(notifications))
            )
            after = notifications[-1].id
            self.resent += len(notifications)
        log.info("re-published positions %d..%d after a reconnect", self._resend_from + 1, until)
        self._resend_from = None

    def _decoded(self, notifications: Sequence[Notification]) -> list[EventEnvelope]:
        decode = self.store.mapper.decode_envelope
        return [positioned(decode(n.state), n.id) for n in notifications]

    def _messages(self, envelopes: Sequence[EventEnvelope]) -> list[tuple[str, OutgoingMessage]]:
        return [
            (self.topology.routing_key(env.type), event_message(env, self.codec))
            for env in envelopes
        ]

    async def _drain(self) -> None:
        while True:
            if not self._may_publish():
                return  # not the leader (any more): the wake-up that follows will see
            self._note_reconnect(self.position)
            envelopes = self._take_handed()
            if envelopes:
                self.from_memory += len(envelopes)
            else:
                notifications = await asyncio.to_thread(
                    self.store.read_notifications, self.position, self.page
                )
                if not notifications:
                    self._caught_up.set()
                    return
                envelopes = self._decoded(notifications)
            items = self._messages(envelopes)
            start = self.position
            await self.transport.publish_many(self.topology.events_exchange, items)
            # Lost and restored while this page was out: it was published after.
            self._note_reconnect(start)
            self.position = envelopes[-1].position or self.position
            await self._save(force=False)
            self.published += len(items)
            self.batches += 1
            if len(envelopes) < self.page and not self._prune_handed():
                self._caught_up.set()
                return
