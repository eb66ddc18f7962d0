"""The consumer runtime: a module's queue, applied once per session version, in order.

aio-pika (and the in-process broker) run each delivery as its own task, so ordering is
ours to keep: deliveries of one session wait on that session's lock (FIFO, so arrival
order), a version at or below what was applied is a duplicate and is acked unseen, and
a version past a gap first fetches the session's history from the coordinator. Sessions
run concurrently up to ``concurrency``.

What is fetched is history, not news: the missing versions, the arriving one and any
the coordinator has after it go to ``apply_history`` together, which folds them and
reacts once to the resulting state (a module restarted after its sessions were
destroyed must not create, link and destroy for each event it missed). So does an
event of a session this process does not know whose store position is at or before
``history_until`` (the position the module's start-up listing reflected): a session
live then would have been listed, so such an event belongs to one already destroyed —
a late redelivery, not a new session. Ack policy: ack after the event is applied; a
failure to apply requeues (the broker's delivery limit dead-letters a message that
keeps failing); an undecodable message goes to the dead-letter queue with its reason
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from contracts import (
    REGISTRY_ID,
    DecodeError,
    ErrorCode,
    EventEnvelope,
    MessageTooLarge,
    Topology,
    codec_for,
)
from module_sdk.errors import CommandFailed, CoordinatorUnavailable
from transport.port import ConsumerHandle, Delivery, Transport, TransportError
from transport.topology import dead_letter

__all__ = ["ConsumerStats", "EventConsumer"]

log = logging.getLogger("sessionbus.module_sdk.consumer")

Apply = Callable[[EventEnvelope], Awaitable[None]]
CurrentVersion = Callable[[uuid.UUID], int]
# (session, last applied version, arriving version) -> the session's events after the
# last applied one, as the coordinator has them (possibly past the arriving one).
FillGap = Callable[[uuid.UUID, int, int], Awaitable[list[EventEnvelope]]]
ApplyHistory = Callable[[Sequence[EventEnvelope]], Awaitable[None]]

# Registry events (orphan clean-up) are not a per-module sequence: remember this many
# event ids to drop duplicates.
_SEEN_REGISTRY: Final = 10_000
# Before requeuing an event whose reaction found the coordinator (or its store) away,
# a pause that doubles with each such failure in a row, up to the last value: a store
# refuses at once, and requeues in a tight loop would spend the queue's delivery limit
# (contracts.topology.DELIVERY_LIMIT) in a second, dead-lettering the event.
_UNAVAILABLE_PAUSE: Final = (0.5, 30.0)


@dataclass
class ConsumerStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    dead_lettered: int = 0
    requeued: int = 0
    histories: int = 0  # deliveries applied by folding the coordinator's history first
    versions: dict[uuid.UUID, list[int]] = field(default_factory=dict)
    record_versions: bool = False


class _SessionLocks:
    """One FIFO lock per session, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[uuid.UUID, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: uuid.UUID) -> asyncio.Lock:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        await lock.acquire()
        return lock

    def release(self, key: uuid.UUID) -> None:
        lock, users = self._locks[key]
        lock.release()
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


class EventConsumer:
    """Consumes one module's queue and calls ``apply`` exactly once per event."""

    def __init__(
        self,
        transport: Transport,
        topology: Topology,
        module_id: str,
        *,
        apply: Apply,
        current_version: CurrentVersion,
        fill_gap: FillGap,
        apply_history: ApplyHistory | None = None,
        prefetch: int = 128,
        concurrency: int = 64,
    ) -> None:
        self.transport = transport
        self.topology = topology
        self.module_id = module_id
        self.queue = topology.module_queue(module_id)
        self._apply = apply
        self._current = current_version
        self._fill_gap = fill_gap
        self._apply_history = apply_history
        # Events of unknown sessions at or before this store position are history (see
        # the module docstring); the manager sets it from its start-up listing.
        self.history_until = 0
        self.prefetch = prefetch
        self._slots = asyncio.Semaphore(concurrency)
        self._locks = _SessionLocks()
        self._seen_registry: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._handle: ConsumerHandle | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.stats = ConsumerStats()
        self._unavailable_streak = 0

    @contextlib.asynccontextmanager
    async def session_turn(self, session_id: uuid.UUID) -> AsyncIterator[None]:
        """Take ``session_id``'s place in line: no delivery of that session is applied
        while it is held (the manager's start-up reconciliation runs in it)."""
        await self._locks.acquire(session_id)
        try:
            yield
        finally:
            self._locks.release(session_id)

    async def start(self) -> None:
        self._handle = await self.transport.consume(
            self.queue, self._on_delivery, prefetch=self.prefetch
        )

    async def stop(self, grace: float = 10.0) -> None:
        """Stop consuming, wait (bounded) for events being applied; what was prefetched
        and not started is returned to the queue."""
        handle, self._handle = self._handle, None
        if handle is not None:
            await handle.cancel()
        current = asyncio.current_task()
        running = {t for t in self._inflight if t is not current}
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
        if handle is not None:
            await handle.close()

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._handle_delivery(delivery)
        except asyncio.CancelledError:
            if not delivery.settled:
                await _quietly(delivery.requeue())
            raise
        except TransportError as exc:
            log.warning("delivery not settled (%s); the broker will redeliver it", exc)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _handle_delivery(self, delivery: Delivery) -> None:
        self.stats.received += 1
        try:
            env = codec_for(delivery.content_type).decode_envelope(delivery.body)
        except DecodeError as exc:
            self.stats.dead_lettered += 1
            code = (
                ErrorCode.MESSAGE_TOO_LARGE
                if isinstance(exc, MessageTooLarge)
                else ErrorCode.INVALID_MESSAGE
            )
            log.warning("dead-lettering an undecodable message on %s: %s", self.queue, exc)
            await dead_letter(
                self.transport,
                self.topology,
                delivery,
                reason=str(exc),
                code=code,
                field=exc.field,
                rejected_by=self.module_id,
            )
            return
        if env.session_id == REGISTRY_ID:
            await self._registry_event(env, delivery)
            return
        sid = env.session_id
        await self._locks.acquire(sid)
        try:
            async with self._slots:
                await self._in_order(env, delivery)
        finally:
            self._locks.release(sid)

    async def _in_order(self, env: EventEnvelope, delivery: Delivery) -> None:
        sid = env.session_id
        current = self._current(sid)
        if env.version <= current:
            self.stats.duplicates += 1
            await delivery.ack()
            return
        try:
            if env.version == current + 1 and not self._is_history(env, current):
                await self._applied(env)
            else:
                events = await self._missing(sid, current, env)
                self.stats.gaps_filled += len(events) - 1  # fetched, not delivered here
                self.stats.histories += 1
                await self._applied_history(events)
        except (_Unfillable, DecodeError) as exc:
            # The coordinator, whose store is the source of truth, has no such session
            # or not the versions before this one; or the event cannot follow the
            # session's state (``fold_session`` refused it): no redelivery can ever
            # apply it.
            self.stats.dead_lettered += 1
            log.warning("dead-lettering an event that cannot be applied on %s: %s", self.queue, exc)
            await dead_letter(
                self.transport,
                self.topology,
                delivery,
                reason=f"event v{env.version} of session {sid} cannot be applied: {exc}",
                code=exc.code if isinstance(exc, _Unfillable) else ErrorCode.INVALID_MESSAGE,
                field=exc.field if isinstance(exc, DecodeError) else "session_id",
                rejected_by=self.module_id,
            )
            return
        except CoordinatorUnavailable as exc:
            # Not a retry policy here: the broker redelivers the requeued event, to this
            # consumer or another; the pause, longer with each one in a row, only
            # keeps a consumer from spinning on a coordinator that is away.
            first, most = _UNAVAILABLE_PAUSE
            pause = min(most, first * 2**self._unavailable_streak)
            self._unavailable_streak += 1
            log.warning(
                "applying %s waits for the coordinator (%s); requeued in %.1f s",
                env.type,
                exc,
                pause,
                extra={"session_id": sid, "event_id": env.event_id, "module_id": self.module_id},
            )
            await asyncio.sleep(pause)
            self.stats.requeued += 1
            await delivery.requeue()
            return
        except Exception:
            log.exception(
                "applying %s failed; requeued",
                env.type,
                extra={
                    "session_id": sid,
                    "event_id": env.event_id,
                    "version": env.version,
                    "module_id": self.module_id,
                },
            )
            self.stats.requeued += 1
            await delivery.requeue()
            return
        self._unavailable_streak = 0
        await delivery.ack()

    def _is_history(self, env: EventEnvelope, current: int) -> bool:
        return (
            current == 0
            and env.position is not None
            and self.history_until > 0
            and env.position <= self.history_until
        )

    async def _missing(
        self, sid: uuid.UUID, applied: int, env: EventEnvelope
    ) -> list[EventEnvelope]:
        """Versions ``applied+1`` to the last the coordinator has (at least to
        ``env``'s), in order; raises ``_Unfillable`` when its history lacks one before
        ``env``."""
        arriving = env.version
        try:
            history = await self._fill_gap(sid, applied, arriving)
        except CommandFailed as exc:
            if exc.code is ErrorCode.UNKNOWN_SESSION:
                raise _Unfillable(
                    ErrorCode.UNKNOWN_SESSION,
                    f"the coordinator does not know the session: {exc.error.message}",
                ) from exc
            raise
        by_version = {e.version: e for e in history if e.version > applied}
        # The coordinator stored the arriving event before it was published; a reply
        # from before that (another replica, lagging) still has everything below it.
        by_version.setdefault(arriving, env)
        versions = sorted(by_version)
        if versions != list(range(applied + 1, versions[-1] + 1)):
            raise _Unfillable(
                ErrorCode.INVALID_MESSAGE,
                f"the coordinator's history has no versions {applied + 1}..{arriving - 1}",
            )
        return [by_version[v] for v in versions]

    async def _applied(self, env: EventEnvelope) -> None:
        await self._apply(env)
        self._count(env)

    async def _applied_history(self, events: Sequence[EventEnvelope]) -> None:
        if self._apply_history is None:
            for env in events:
                await self._applied(env)
            return
        await self._apply_history(events)
        for env in events:
            self._count(env)

    def _count(self, env: EventEnvelope) -> None:
        self.stats.applied += 1
        if self.stats.record_versions:
            self.stats.versions.setdefault(env.session_id, []).append(env.version)

    async def _registry_event(self, env: EventEnvelope, delivery: Delivery) -> None:
        if env.event_id in self._seen_registry:
            self.stats.duplicates += 1
            await delivery.ack()
            return
        try:
            await self._apply(env)
        except Exception:
            log.exception("applying registry event %s failed; requeued", env.type)
            self.stats.requeued += 1
            await delivery.requeue()
            return
        self._seen_registry[env.event_id] = None
        if len(self._seen_registry) > _SEEN_REGISTRY:
            self._seen_registry.popitem(last=False)
        self.stats.applied += 1
        await delivery.ack()


async def _quietly(awaitable: Awaitable[None]) -> None:
    with contextlib.suppress(TransportError):
        await awaitable


class _Unfillable(Exception):
    """An event whose earlier versions the coordinator does not have."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
