"""A whole sessionbus as OS processes, for the fault tests: ``sessionctl coordinator``
on a SQLite store, journaling module processes, and this test's own client.

``ProcessSystem`` starts, kills and restarts each party, waits for the system to
settle (everything committed is published, every module queue drained), stops it
gracefully, and hands the store, the journals and the audit stream to the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts import Topology
from coordinator.domain.identity import IdentityMap
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient, CoordinatorUnavailable
from tests.support.checker import (
    CheckReport,
    Incarnation,
    StoreView,
    check,
    read_journal,
    read_published,
)
from tests.support.journal_module import JournalModule, incarnation
from tests.support.load import LoadResult, SessionLoad
from tests.support.processes import Child, coordinator_argv, journal_module_argv
from transport.amqp import AmqpTransport
from transport.port import TransportError

__all__ = [
    "InProcessSystem",
    "ProcessSystem",
    "inprocess_system",
    "process_system",
    "wait_until",
]


async def wait_until(predicate: object, *, timeout: float, what: str, every: float = 0.05) -> None:
    """Wait (bounded) until ``predicate()`` — sync or async — is true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


async def end_load_after(
    load: SessionLoad, running: asyncio.Task[LoadResult], moment: float
) -> LoadResult:
    """End a load started with ``until`` once a request sent after the last fault
    (``moment``, ``time.monotonic()``) has been answered, and return its result: the
    faults then all strike mid-load however slow the machine makes them."""
    await wait_until(
        lambda: load.answered_after(moment),
        timeout=60,
        what="a request answered after the last fault",
    )
    assert load.until is not None
    load.until.set()
    return await running


@dataclass
class ProcessSystem:
    url: str
    prefix: str
    directory: Path
    module_ids: Sequence[str]
    client_url: str | None = None
    coordinator: Child | None = None
    modules: dict[str, Child] = field(default_factory=dict)
    transport: AmqpTransport | None = None

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    @property
    def store(self) -> str:
        return f"sqlite:///{self.directory / 'coordinator.sqlite'}"

    def journal(self, module_id: str) -> Path:
        return self.directory / f"{module_id}.jsonl"

    @property
    def client(self) -> CoordinatorClient:
        assert self.transport is not None
        return CoordinatorClient(self.transport, self.topology, timeout=2.0, attempts=2)

    async def start_coordinator(self) -> Child:
        if self.coordinator is None:
            self.coordinator = Child(
                "coordinator", coordinator_argv(self.url, self.store, self.prefix)
            )
        return await self.coordinator.start(ready="; ready")

    def module(self, module_id: str, url: str | None = None) -> Child:
        if module_id not in self.modules:
            self.modules[module_id] = Child(
                module_id,
                journal_module_argv(
                    module_id, url or self.url, self.prefix, self.journal(module_id)
                ),
            )
        return self.modules[module_id]

    async def start(self) -> None:
        await self.start_coordinator()
        await asyncio.gather(*(self.module(m).start() for m in self.module_ids))
        self.transport = AmqpTransport(
            self.client_url or self.url, connection_name=f"{self.prefix} fault-test client"
        )
        await self.transport.connect()

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until the coordinator has published everything it stored and every
        module queue is empty."""
        client = self.client
        assert self.transport is not None
        transport = self.transport

        async def published() -> bool:
            try:
                health = await client.get_coordinator_health()
            except (CoordinatorUnavailable, TransportError):
                return False
            return health.published_position == health.store_position

        async def drained() -> bool:
            for module_id in self.module_ids:
                try:
                    stats = await transport.queue_stats(self.topology.module_queue(module_id))
                except TransportError:
                    return False
                if stats is None or stats.messages:
                    return False
            return True

        async def settled() -> bool:
            return await published() and await drained()

        await wait_until(settled, timeout=timeout, what="the system to settle", every=0.2)
        # One more look after a pause: a message in flight is in no queue's count.
        await asyncio.sleep(0.5)
        await wait_until(settled, timeout=timeout, what="the system to settle", every=0.2)

    async def stop(self) -> None:
        """Stop the modules, then the coordinator, gracefully; each must exit 0."""
        codes = await asyncio.gather(*(child.stop() for child in self.modules.values()))
        for (module_id, child), code in zip(self.modules.items(), codes, strict=True):
            assert code == 0, f"{module_id} exited with {code}:\n{child.output}"
        if self.coordinator is not None:
            code = await self.coordinator.stop()
            assert code == 0, f"the coordinator exited with {code}:\n{self.coordinator.output}"

    async def published(self) -> Counter:  # type: ignore[type-arg]
        assert self.transport is not None
        return await read_published(self.transport, self.topology)

    def lives(self, module_id: str) -> list[Incarnation]:
        return read_journal(self.journal(module_id))

    async def check(self, sessions: Sequence[object]) -> tuple[CheckReport, StoreView]:
        """The checker over the store, every module's journal and the audit stream."""
        published = await self.published()
        view = await asyncio.to_thread(StoreView.read, self.store)
        applied = {m: self.lives(m) for m in self.module_ids}
        report = check(view, applied, sessions=sessions, published=published)  # type: ignore[arg-type]
        return report, view

    def resumed_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first event any module applied after it."""
        times = [
            t
            for module_id in self.module_ids
            for life in self.lives(module_id)
            for t in life.times
            if t > moment
        ]
        return min(times) - moment if times else None

    async def aclose(self) -> None:
        for child in [*self.modules.values(), self.coordinator]:
            if child is not None:
                child.kill_now()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.transport.close(), 10)


@contextlib.asynccontextmanager
async def process_system(
    url: str,
    prefix: str,
    directory: Path,
    module_ids: Sequence[str],
    *,
    client_url: str | None = None,
    start: bool = True,
) -> AsyncIterator[ProcessSystem]:
    system = ProcessSystem(url, prefix, directory, module_ids, client_url=client_url)
    try:
        if start:
            await system.start()
        yield system
    finally:
        await system.aclose()


@dataclass
class InProcessSystem:
    """The coordinator (``CoordinatorRuntime`` on a SQLite store) and journaling
    modules in this process, each on a broker connection of its own."""

    url: str
    prefix: str
    directory: Path
    name: str
    identity: str = "guest=*"
    runtime: CoordinatorRuntime | None = None
    modules: dict[str, JournalModule] = field(default_factory=dict)
    transports: list[AmqpTransport] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    @property
    def store(self) -> str:
        return f"sqlite:///{self.directory / 'coordinator.sqlite'}"

    async def start_coordinator(self, **options: Any) -> CoordinatorRuntime:
        self.runtime = CoordinatorRuntime(
            AmqpTransport(self.url, connection_name=f"{self.name} coordinator"),
            store=self.store,
            topology=self.topology,
            identity=IdentityMap.parse(self.identity),
            **options,
        )
        await self.runtime.start()
        return self.runtime

    async def connect(self, role: str, url: str | None = None) -> AmqpTransport:
        transport = AmqpTransport(url or self.url, connection_name=f"{self.name} {role}")
        await transport.connect()
        self.transports.append(transport)
        return transport

    async def client(
        self, role: str = "client", *, timeout: float = 2.0, attempts: int = 2
    ) -> CoordinatorClient:
        transport = await self.connect(role)
        return CoordinatorClient(transport, self.topology, timeout=timeout, attempts=attempts)

    async def add_module(
        self,
        module_id: str,
        *,
        url: str | None = None,
        cls: type[JournalModule] = JournalModule,
        **options: Any,
    ) -> JournalModule:
        options.setdefault("heartbeat_interval", 1.0)
        options.setdefault("client_timeout", 3.0)
        module = cls(
            AmqpTransport(url or self.url, connection_name=f"{self.name} {module_id}"),
            module_id=module_id,
            topology=self.topology,
            own_transport=True,
            **options,
        )
        await module.start()
        self.modules[module_id] = module
        return module

    async def settle(self, timeout: float = 60.0, modules: Sequence[str] | None = None) -> None:
        """Everything stored is published, and the module queues are empty."""
        assert self.runtime is not None
        runtime = self.runtime
        await runtime.wait_published(timeout)
        names = list(self.modules) if modules is None else list(modules)
        transport = self.transports[0] if self.transports else await self.connect("settle")

        async def drained() -> bool:
            for module_id in names:
                stats = await transport.queue_stats(self.topology.module_queue(module_id))
                if stats is None or stats.messages:
                    return False
            return True

        await wait_until(drained, timeout=timeout, what="the module queues to drain", every=0.1)
        await asyncio.sleep(0.3)
        await runtime.wait_published(timeout)
        await wait_until(drained, timeout=timeout, what="the module queues to drain", every=0.1)

    async def close_modules(self) -> None:
        for module in self.modules.values():
            await module.close()

    async def check(
        self, sessions: Sequence[uuid.UUID], modules: Sequence[str] | None = None
    ) -> CheckReport:
        """Close the modules, read the audit stream and the store, and check."""
        await self.close_modules()
        transport = self.transports[0] if self.transports else await self.connect("auditor")
        published = await read_published(transport, self.topology)
        view = await asyncio.to_thread(StoreView.read, self.store)
        names = list(self.modules) if modules is None else list(modules)
        applied = {m: incarnation(self.modules[m]) for m in names}
        return check(view, applied, sessions=sessions, published=published)

    async def aclose(self) -> None:
        for module in self.modules.values():
            with contextlib.suppress(Exception):
                await module.close()
        for transport in self.transports:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.close(), 10)
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                await self.runtime.close()


@contextlib.asynccontextmanager
async def inprocess_system(
    url: str, prefix: str, directory: Path, name: str, **options: Any
) -> AsyncIterator[InProcessSystem]:
    system = InProcessSystem(url, prefix, directory, name, **options)
    try:
        yield system
    finally:
        await system.aclose()
