"""The coordinator service as one unit: store, writer, projections, relay, command
server, heartbeats and health, started and stopped in a fixed order."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from contracts import DEFAULT_PREFIX, Topology
from contracts.topology import DEFAULT_AUDIT_RETENTION
from contracts.transport import Transport
from coordinator.clock import Clock
from coordinator.identity import IdentityMap
from coordinator.metrics import CoordinatorMetrics
from coordinator.relay import OutboxRelay
from coordinator.server import CommandServer, HealthMonitor, HeartbeatListener
from coordinator.service import SessionCoordinator

__all__ = ["CoordinatorRuntime"]

log = logging.getLogger("sessionbus.coordinator.runtime")


class CoordinatorRuntime:
    """``async with CoordinatorRuntime(transport, store="sqlite:///s.db") as rt: …``

    Start: declare topology → rebuild projections → relay → command server →
    heartbeats → health. Stop, in reverse: stop taking commands and finish the running
    ones → let the writer drain → publish what was committed → stop the rest → close
    the store → close the transport (if this runtime opened it).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        store: str | None = None,
        topology: Topology | None = None,
        identity: IdentityMap | None = None,
        clock: Clock | None = None,
        audit_retention: str = DEFAULT_AUDIT_RETENTION,
        health_interval: float = 1.0,
        prefetch: int = 256,
        own_transport: bool = True,
        metrics_port: int | None = None,
        **coordinator_options: Any,
    ) -> None:
        self.transport = transport
        self.topology = topology or Topology(DEFAULT_PREFIX)
        self.identity = identity or IdentityMap.from_env(transport.user)
        self.audit_retention = audit_retention
        self.own_transport = own_transport
        self.coordinator = SessionCoordinator(store, clock=clock, **coordinator_options)
        self.relay: OutboxRelay | None = None
        self.server = CommandServer(
            self.coordinator, transport, self.topology, self.identity, prefetch=prefetch
        )
        self.heartbeats = HeartbeatListener(
            self.coordinator, transport, self.topology, self.identity
        )
        self.health = HealthMonitor(self.coordinator, interval=health_interval)
        self.metrics = CoordinatorMetrics(self)
        self.server.metrics = self.metrics
        self.metrics_port = metrics_port
        self._started = False
        self._closed = False

    async def __aenter__(self) -> CoordinatorRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start everything; if a step fails, stop what had started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        if self.own_transport:
            await self.transport.connect()
        await self.topology.declare(self.transport, audit_retention=self.audit_retention)
        await self.coordinator.start()
        assert self.coordinator.store is not None
        self.relay = OutboxRelay(self.coordinator.store, self.transport, self.topology)
        self.coordinator.add_commit_listener(self.relay.wake)
        await self.relay.start()
        await self.server.start()
        await self.heartbeats.start()
        await self.health.start()
        await self.metrics.start_sampling()
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        self._started = True
        self.identity.announce()
        log.info("coordinator running on prefix %r", self.topology.prefix)

    async def close(self) -> None:
        """Stop in order; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.server.stop()
        await self.metrics.close()
        await self.health.stop()
        await self.heartbeats.stop()
        await self.coordinator.drain()
        if self.relay is not None:
            await self.relay.close()
            self.coordinator.published_position = self.relay.position
        await self.coordinator.close()
        if self.own_transport:
            await self.transport.close()

    async def wait_published(self, timeout: float = 10.0) -> None:
        """Wait until every committed event has been published."""
        assert self.relay is not None
        await self.relay.wait_idle(timeout)
        self.coordinator.published_position = self.relay.position

    async def serve_forever(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (signals set it), keeping health figures fresh."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                if self.relay is not None:
                    self.coordinator.published_position = self.relay.position
