"""The coordinator service as one unit: store, writer, projections, relay, command
server, heartbeats and health, started and stopped in a fixed order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from contracts import DEFAULT_PREFIX, EventEnvelope, Topology
from contracts.topology import DEFAULT_AUDIT_RETENTION
from coordinator.domain.clock import Clock
from coordinator.domain.identity import IdentityMap
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.leader import Leadership
from coordinator.service.metrics import CoordinatorMetrics
from coordinator.service.relay import OutboxRelay
from coordinator.service.server import CommandServer, HealthMonitor, HeartbeatListener
from coordinator.service.settings import CoordinatorSettings
from coordinator.store.eventstore import SQLiteClaim, StoreSettings
from transport.port import Transport
from transport.topology import declare_topology

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
        replica: tuple[int, int] | None = None,
        leadership_interval: float = 1.0,
        settings: CoordinatorSettings | None = None,
        **coordinator_options: Any,
    ) -> None:
        if store is None or identity is None:
            # What the caller leaves out comes from the process's settings, as for
            # ``sessionctl coordinator``: an identity map left out must not quietly
            # become development mode where SESSIONBUS_IDENTITY names one.
            settings = settings or CoordinatorSettings.from_env()
            store = settings.store if store is None else store
            identity = identity or settings.identity_map(transport.user)
        self.transport = transport
        self.topology = topology or Topology(DEFAULT_PREFIX)
        self.identity = identity
        self.audit_retention = audit_retention
        self.own_transport = own_transport
        self.coordinator = SessionCoordinator(store, clock=clock, **coordinator_options)
        self._store_url = store
        self._claim: SQLiteClaim | None = None
        self.relay: OutboxRelay | None = None
        self.server = CommandServer(
            self.coordinator,
            transport,
            self.topology,
            self.identity,
            prefetch=prefetch,
            replica=replica,
        )
        self.leadership_interval = leadership_interval
        self.leadership: Leadership | None = None
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
        await declare_topology(self.transport, self.topology, audit_retention=self.audit_retention)
        # One coordinator per SQLite file (see SQLiteClaim): refused before it rebuilds.
        self._claim = SQLiteClaim.take(StoreSettings.from_url(self._store_url))
        await self.coordinator.start()
        store = self.coordinator.store
        assert store is not None
        # Until this coordinator holds the store's leadership it neither publishes nor
        # fires timeouts nor reports health loss: another replica does.
        self.coordinator.set_fires_timeouts(False)
        self.health.active = False
        self.coordinator.add_commit_listener(self._wake_relay)
        self.leadership = Leadership(
            store.settings,
            f"leader:{self.topology.prefix}",
            self._on_leadership,
            interval=self.leadership_interval,
        )
        await self.leadership.start()
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
            # Publish what is committed before giving leadership up.
            await self.relay.close()
            self.coordinator.published_position = self.relay.position
        if self.leadership is not None:
            await self.leadership.close()
        await self.coordinator.close()
        if self._claim is not None:
            self._claim.release()
            self._claim = None
        if self.own_transport:
            await self.transport.close()

    @property
    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.is_leader

    def _wake_relay(self, saved: Sequence[EventEnvelope]) -> None:
        if self.relay is not None:
            self.relay.offer(saved)

    async def _on_leadership(self, leader: bool) -> None:
        store = self.coordinator.store
        assert store is not None
        if leader:
            assert self.leadership is not None
            self.relay = OutboxRelay(
                store, self.transport, self.topology, fence=self.leadership.holds_lease
            )
            await self.relay.start()
            self.coordinator.set_fires_timeouts(True)
            self.health.active = True
        else:
            self.health.active = False
            self.coordinator.set_fires_timeouts(False)
            if self._closed:
                return  # close() already drained the relay; keep it for inspection
            relay, self.relay = self.relay, None
            if relay is not None:
                await relay.close()

    async def wait_published(self, timeout: float = 10.0) -> None:
        """Wait until every committed event has been published (by this coordinator,
        which must be the store's leader)."""
        assert self.relay is not None, "only the store's leader publishes"
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
