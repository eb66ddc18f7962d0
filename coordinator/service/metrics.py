"""Prometheus metrics of a running coordinator.

Counters and the command latency histogram are updated as things happen; gauges
(relay lag, sessions by status, module health, DLQ depth) are read from the
coordinator's state at scrape time, so a scrape always sees the present. Each runtime
has its own registry, so several coordinators can live in one process (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from contracts.topology import DLQ_HEADERS, Topology
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.relay import OutboxRelay
from transport.port import ConsumerHandle, Delivery, Transport, TransportError

__all__ = ["CoordinatorMetrics", "MetricsSource"]

log = logging.getLogger("sessionbus.coordinator.metrics")


class MetricsSource(Protocol):
    """What the metrics read at scrape time: the runtime's parts (a protocol, so the
    runtime that owns the metrics is not imported by them)."""

    @property
    def coordinator(self) -> SessionCoordinator: ...
    @property
    def relay(self) -> OutboxRelay | None: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def topology(self) -> Topology: ...


class _StateCollector(Collector):
    def __init__(self, runtime: MetricsSource) -> None:
        self.runtime = runtime
        self.dlq_depth: int | None = None

    def collect(self) -> Iterator[Any]:
        runtime = self.runtime
        proj = runtime.coordinator.projections
        published = runtime.relay.position if runtime.relay is not None else 0
        lag = GaugeMetricFamily(
            "sessionbus_relay_lag_events", "Committed events not yet published by the relay."
        )
        lag.add_metric([], max(0, proj.position - published))
        yield lag
        published_total = CounterMetricFamily(
            "sessionbus_events_published", "Events published by the relay (this process)."
        )
        published_total.add_metric([], runtime.relay.published if runtime.relay is not None else 0)
        yield published_total
        position = GaugeMetricFamily(
            "sessionbus_store_position", "Global position of the last event in the projections."
        )
        position.add_metric([], proj.position)
        yield position
        sessions = GaugeMetricFamily(
            "sessionbus_sessions", "Workflow sessions not destroyed, by status.", labels=["status"]
        )
        for status, count in proj.status_counts().items():
            sessions.add_metric([status.value], count)
        yield sessions
        destroyed = GaugeMetricFamily("sessionbus_sessions_destroyed", "Destroyed sessions.")
        destroyed.add_metric([], proj.destroyed)
        yield destroyed
        healthy = GaugeMetricFamily(
            "sessionbus_module_healthy",
            "1 while a module's heartbeats are fresh.",
            labels=["module"],
        )
        now = runtime.coordinator.clock.now()
        for module_id in sorted(proj.modules):
            healthy.add_metric([module_id], 1.0 if proj.is_healthy(module_id, now) else 0.0)
        yield healthy
        if self.dlq_depth is not None:
            dlq = GaugeMetricFamily(
                "sessionbus_dlq_depth", "Dead letters not yet replayed or discarded."
            )
            dlq.add_metric([], self.dlq_depth)
            yield dlq


class CoordinatorMetrics:
    """The coordinator's metrics and, when a port is given, the /metrics endpoint."""

    def __init__(self, runtime: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.commands = Counter(
            "sessionbus_commands",
            "Commands handled, by type and outcome (ok or the error code).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.command_seconds = Histogram(
            "sessionbus_command_seconds",
            "Time from a command's delivery to its reply.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.state = _StateCollector(runtime)
        self.registry.register(self.state)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._follower: ConsumerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._kept = 0  # letters in the dead-letter stream not settled
        self._inbox = 0  # letters in the dead-letter inbox
        self._runtime = runtime

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint; returns the port (0 picks a free one)."""
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    async def start_sampling(self, interval: float = 5.0) -> None:
        """Follow the dead-letter stream from its first entry, keeping the number of
        letters not yet settled (replayed or discarded; entries are counted by offset,
        so a re-read after a reconnect counts nothing twice), and sample the depth of
        the dead-letter inbox (letters not yet moved to the stream) every
        ``interval`` seconds."""
        letters: set[int] = set()
        settled: set[int] = set()

        async def on_delivery(delivery: Delivery) -> None:
            await delivery.ack()  # credit only: a stream keeps its entries
            offset = delivery.headers.get("x-stream-offset")
            entry = delivery.headers.get(DLQ_HEADERS.ENTRY)
            if isinstance(entry, bytes):
                entry = entry.decode()
            if entry is None and offset is not None:
                letters.add(int(offset))
            elif entry == "settled":
                settled.add(int(delivery.headers[DLQ_HEADERS.SETTLES]))
            self._kept = len(letters - settled)
            self.state.dlq_depth = self._kept + self._inbox

        runtime = self._runtime
        self.state.dlq_depth = 0
        self._task = asyncio.create_task(self._sample(interval), name="sessionbus-metrics")
        try:
            self._follower = await runtime.transport.consume(
                runtime.topology.dead_letter_stream,
                on_delivery,
                prefetch=1000,
                arguments={"x-stream-offset": "first"},
            )
        except TransportError as exc:  # the metric is missing, the coordinator runs
            log.warning("dead letters in the stream not counted: %s", exc)

    async def _sample(self, interval: float) -> None:
        runtime = self._runtime
        while True:
            try:
                stats = await runtime.transport.queue_stats(runtime.topology.dead_letter_queue)
                self._inbox = stats.messages if stats is not None else 0
                self.state.dlq_depth = self._kept + self._inbox
            except Exception as exc:  # noqa: BLE001 - a missed sample is only logged
                log.debug("DLQ depth not sampled: %s", exc)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._follower is not None:
            with contextlib.suppress(Exception):
                await self._follower.close()
            self._follower = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
