"""The coordinator on the bus: commands in, replies out, heartbeats in.

Commands are request/reply over the commands queue with RabbitMQ's direct reply-to.
Each delivery is decoded strictly; who sent it is the broker-validated ``user_id``
mapped through the ``IdentityMap``, never the body. The reply is sent before the
command is acked, and a redelivered command is answered from its command id, so a
crash anywhere in between costs a duplicate reply at most, never a second application.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from typing import Final

import msgspec

from contracts import (
    ACTIVE_STATUSES,
    Codec,
    CommandReply,
    DecodeError,
    ErrorCode,
    MessageTooLarge,
    ReportError,
    StandardError,
    Topology,
    codec_for,
    new_id,
)
from contracts.topology import QueueSpec
from coordinator.domain.aggregates import COORDINATOR
from coordinator.domain.identity import IdentityMap
from coordinator.errors import CommandRejected
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.metrics import CoordinatorMetrics
from transport.port import ConsumerHandle, Delivery, OutgoingMessage, Transport, TransportError
from transport.topology import dead_letter
from transport.tracing import correlation_from_headers

__all__ = ["CommandServer", "HealthMonitor", "HeartbeatListener"]

log = logging.getLogger("sessionbus.coordinator.server")

_NIL: Final = uuid.UUID(int=0)
# A coordinator's heartbeat queue is deleted this long after its consumer is gone.
HEARTBEAT_QUEUE_EXPIRES_MS: Final = 300_000
_JSON: Final = Codec("json")
# Replies that say "not now": the command is requeued once before it is answered so.
_UNAVAILABLE: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.STORE_UNAVAILABLE})
_command_id_only = msgspec.json.Decoder(dict[str, object])


def _salvage_command_id(body: bytes) -> uuid.UUID:
    """The command id of a request that failed to decode, if it can be read at all, so
    the client can match the error reply to its request."""
    try:
        raw = _command_id_only.decode(body)
        return uuid.UUID(str(raw.get("command_id")))
    except (msgspec.DecodeError, ValueError, TypeError):
        return _NIL


class CommandServer:
    """Consumes every commands queue (partition) and answers every request.

    Each partition queue has a single active consumer, so of several coordinators one
    owns a partition at a time and the next takes over when its connection goes. With
    ``replica=(i, n)`` this coordinator subscribes first to the partitions ``p % n == i``
    and to the others ``standby_delay`` seconds later, so replicas started together
    share the partitions; a late starter is a standby until an owner goes.
    """

    def __init__(
        self,
        coordinator: SessionCoordinator,
        transport: Transport,
        topology: Topology,
        identity: IdentityMap,
        *,
        prefetch: int = 256,
        replica: tuple[int, int] | None = None,
        standby_delay: float = 2.0,
    ) -> None:
        self.coordinator = coordinator
        self.transport = transport
        self.topology = topology
        self.identity = identity
        self.prefetch = prefetch
        self.replica = replica
        self.standby_delay = standby_delay
        self.queues = topology.command_queues()
        self._handles: list[ConsumerHandle] = []
        self._later: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.handled = 0
        self.rejected = 0
        self.refused = 0  # answered "unavailable" (retryable) after a requeue
        self.metrics: CoordinatorMetrics | None = None

    def _first(self) -> tuple[list[str], list[str]]:
        if self.replica is None or len(self.queues) == 1:
            return self.queues, []
        index, count = self.replica
        mine = [q for p, q in enumerate(self.queues) if p % count == index]
        return mine, [q for q in self.queues if q not in mine]

    async def start(self) -> None:
        mine, others = self._first()
        for queue in mine:
            await self._consume(queue)
        if others:
            self._later = asyncio.create_task(self._standby(others), name="commands-standby")

    async def _consume(self, queue: str) -> None:
        self._handles.append(
            await self.transport.consume(queue, self._on_delivery, prefetch=self.prefetch)
        )

    async def _standby(self, queues: list[str]) -> None:
        await asyncio.sleep(self.standby_delay)
        for queue in queues:
            await self._consume(queue)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop consuming, then wait (bounded) for the commands being handled. What was
        prefetched but not started goes back to the queue when the channel closes."""
        if self._later is not None:
            self._later.cancel()
            await asyncio.gather(self._later, return_exceptions=True)
            self._later = None
        handles, self._handles = self._handles, []
        for handle in handles:
            await handle.cancel()
        current = asyncio.current_task()
        running = {t for t in self._inflight if t is not current}
        if running:
            await asyncio.wait(running, timeout=grace)

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._handle_delivery(delivery)
        except TransportError as exc:
            log.warning("command delivery not settled (%s); the broker will redeliver", exc)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _handle_delivery(self, delivery: Delivery) -> None:
        try:
            codec = codec_for(delivery.content_type)
            request = codec.decode_request(delivery.body)
        except DecodeError as exc:
            self.rejected += 1
            code = (
                ErrorCode.MESSAGE_TOO_LARGE
                if isinstance(exc, MessageTooLarge)
                else ErrorCode.INVALID_MESSAGE
            )
            error = StandardError(code=code, message=str(exc), field=exc.field)
            await self._reply(
                delivery, CommandReply(command_id=_salvage_command_id(delivery.body), error=error)
            )
            await dead_letter(
                self.transport,
                self.topology,
                delivery,
                reason=str(exc),
                code=code,
                field=exc.field,
                rejected_by="coordinator",
            )
            return
        principal = self.identity.principal_for(delivery.user_id)
        if principal is None:
            self.rejected += 1
            who = delivery.user_id or "a message without user_id"
            error = StandardError(
                code=ErrorCode.FORBIDDEN,
                message=f"broker user {who!r} is not allowed to send commands",
            )
            await self._reply(delivery, CommandReply(command_id=request.command_id, error=error))
            await delivery.ack()
            return
        if request.correlation_id is None:
            # A traced sender without an explicit correlation id: its trace is the
            # correlation, so the events it causes join the same trace.
            trace = correlation_from_headers(delivery.headers)
            if trace is not None:
                request = msgspec.structs.replace(request, correlation_id=trace)
        started = time.perf_counter()
        reply = await self.coordinator.execute(request, principal)
        if self.metrics is not None:
            outcome = "ok" if reply.error is None else str(reply.error.code)
            self.metrics.commands.labels(request.command.__class__.__name__, outcome).inc()
            self.metrics.command_seconds.observe(time.perf_counter() - started)
        if reply.error is not None and reply.error.code in _UNAVAILABLE:
            if not delivery.redelivered:
                # The coordinator is shutting down or its store is away: let another
                # attempt (or another coordinator) have it. A redelivered command is
                # answered instead, so a command is requeued once, never in a loop.
                await delivery.requeue()
                return
            self.refused += 1
            log.warning(
                "%s %s refused: %s",
                type(request.command).__name__,
                request.command_id,
                reply.error.message,
            )
        await self._reply(delivery, reply, codec=codec)
        await delivery.ack()
        self.handled += 1

    async def _reply(
        self, delivery: Delivery, reply: CommandReply, codec: Codec | None = None
    ) -> None:
        if not delivery.reply_to:
            return
        if codec is None:
            try:
                codec = codec_for(delivery.content_type)
            except DecodeError:
                codec = _JSON  # the request's own format is unknown: answer in JSON
        try:
            await self.transport.send(
                delivery.reply_to,
                OutgoingMessage(
                    body=codec.encode(reply),
                    content_type=codec.content_type,
                    correlation_id=delivery.correlation_id,
                    persistent=False,
                ),
            )
        except TransportError as exc:
            log.warning("reply to %s lost: %s", delivery.reply_to, exc)


class HeartbeatListener:
    """Receives module heartbeats (not event-sourced) into the coordinator's view of
    module health. A heartbeat counts only for modules its sender may act for."""

    def __init__(
        self,
        coordinator: SessionCoordinator,
        transport: Transport,
        topology: Topology,
        identity: IdentityMap,
        *,
        instance: str | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.transport = transport
        self.topology = topology
        self.identity = identity
        self.queue = topology.heartbeats_queue_for(instance or new_id().hex[:12])
        self._handle: ConsumerHandle | None = None
        self.received = 0

    async def start(self) -> None:
        # Not exclusive, not auto-delete: the broker would delete such a queue with the
        # connection, and the reconnected consumer would find nothing to consume (a
        # robust connection then fails its whole restore, and keeps failing). The
        # queue instead outlives a lost connection and expires once nobody uses it.
        # Quorum: a classic queue lives on one node of a cluster, and while that node is
        # down no other node can restore a consumer of it, so the coordinator's whole
        # connection could not be restored on another node.
        await self.transport.declare_queue(
            QueueSpec(
                self.queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-expires": HEARTBEAT_QUEUE_EXPIRES_MS,
                    "x-message-ttl": 60_000,
                    "x-max-length": 100_000,
                    "x-overflow": "drop-head",  # the oldest heartbeats go first
                },
                bindings=[(self.topology.heartbeats_exchange, "")],
            )
        )
        self._handle = await self.transport.consume(self.queue, self._on_delivery, prefetch=512)

    async def stop(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            await handle.cancel()

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            heartbeat = codec_for(delivery.content_type).decode_heartbeat(delivery.body)
        except DecodeError as exc:
            log.warning("undecodable heartbeat dropped: %s", exc)
            await delivery.ack()
            return
        principal = self.identity.principal_for(delivery.user_id)
        if principal is not None and principal.may_act_for(heartbeat.module_id):
            self.coordinator.record_heartbeat(heartbeat)
            self.received += 1
        else:
            log.warning(
                "heartbeat for %s from broker user %r ignored: not allowed",
                heartbeat.module_id,
                delivery.user_id,
            )
        await delivery.ack()


class HealthMonitor:
    """Turns a module's loss of health into events: an ErrorReported (not fatal) on
    every live session it is linked to, once per loss."""

    def __init__(self, coordinator: SessionCoordinator, *, interval: float = 1.0) -> None:
        self.coordinator = coordinator
        self.interval = interval
        # Only the store's leader reports, or every replica would report each loss.
        self.active = True
        self._healthy: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None
        self.reported = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sessionbus-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.active:
                continue
            try:
                await self.check()
            except Exception:
                log.exception("health check failed")

    async def check(self) -> int:
        """Compare health now with the last check; report modules that lost it."""
        coordinator = self.coordinator
        proj = coordinator.projections
        now = coordinator.clock.now()
        lost: list[str] = []
        for module_id in list(proj.modules):
            healthy = proj.is_healthy(module_id, now)
            if self._healthy.get(module_id) and not healthy:
                lost.append(module_id)
            if module_id in proj.heartbeats:
                self._healthy[module_id] = healthy
        reports = 0
        for module_id in lost:
            seen = proj.heartbeats.get(module_id)
            age = now - seen[1] if seen else timedelta(0)
            error = StandardError(
                code=ErrorCode.MODULE_UNHEALTHY,
                message=f"module {module_id} sent no healthy heartbeat for "
                f"{age.total_seconds():.1f} s",
                module_id=module_id,
                retryable=True,
            )
            for session_id in list(proj.by_module.get(module_id, ())):
                session = proj.sessions.get(session_id)
                if session is None or session.status not in ACTIVE_STATUSES:
                    continue
                try:
                    await coordinator.handle(
                        ReportError(
                            session_id=session_id, error=error, module_id=module_id, fatal=False
                        ),
                        COORDINATOR,
                    )
                    reports += 1
                except CommandRejected as exc:
                    log.debug("health report on %s refused: %s", session_id, exc)
        self.reported += reports
        return reports
