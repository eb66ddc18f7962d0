"""``ProcessSystem`` on a PostgreSQL store: one ``sessionctl coordinator`` or several
replicas (command partitions, one leader by the store's advisory lock), optionally
connected to the database through a TCP proxy, with journaling module processes.

What was published is read from the store itself (the relay's checkpoint against the
last position), so it holds whichever replica leads. ``PublishWatch`` samples that
checkpoint to time how long after the database came back publishing resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.sql import SQL, Identifier

from contracts import Topology
from tests.faults.harness import ProcessSystem, wait_until
from tests.support.processes import Child, coordinator_argv

__all__ = ["PgSystem", "PublishWatch", "pg_system"]


def _schema(store_url: str) -> str:
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(store_url).query))
    return query.get("schema", "public")


def _dsn(store_url: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(store_url)._replace(query=""))


def positions(store_url: str, prefix: str) -> tuple[int, int]:
    """(last stored position, the relay's saved position) of a PostgreSQL store."""
    schema = Identifier(_schema(store_url))
    with psycopg.connect(_dsn(store_url), autocommit=True, connect_timeout=3) as conn:
        top = conn.execute(
            SQL("SELECT coalesce(max(notification_id), 0) FROM {}.sessionbus_events").format(schema)
        ).fetchone()
        relay = conn.execute(
            SQL("SELECT position FROM {}.sessionbus_checkpoints WHERE name = %s").format(schema),
            (f"relay:{prefix}",),
        ).fetchone()
    return (int(top[0]) if top else 0, int(relay[0]) if relay else 0)


@dataclass
class PgSystem(ProcessSystem):
    store_url: str = ""  # what the test reads (directly)
    coordinator_store: str = ""  # what the coordinators use (maybe through a proxy)
    replicas: int = 1
    partitions: int = 1
    coordinators: list[Child] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix, self.partitions)

    @property
    def store(self) -> str:
        return self.store_url

    def _env(self) -> dict[str, str]:
        return {"SESSIONBUS_PARTITIONS": str(self.partitions)}

    async def start_coordinator(self) -> Child:
        if not self.coordinators:
            for index in range(self.replicas):
                argv = coordinator_argv(self.url, self.coordinator_store, self.prefix)
                argv += ["--metrics-port", "0"]  # a free port, named in the ready line
                if self.replicas > 1:
                    argv += ["--replica", f"{index}/{self.replicas}"]
                self.coordinators.append(Child(f"coordinator-{index}", argv, env=self._env()))
            self.coordinator = self.coordinators[0]
        for child in self.coordinators:
            await child.start(ready="; ready")
        return self.coordinators[0]

    def module(self, module_id: str, url: str | None = None) -> Child:
        child = super().module(module_id, url)
        child.env.update(self._env())
        return child

    async def settle(self, timeout: float = 60.0) -> None:
        """Everything stored is published (the relay's saved position has reached the
        last stored one) and every module queue is empty."""
        assert self.transport is not None
        transport = self.transport

        async def published() -> bool:
            try:
                top, relay = await asyncio.to_thread(positions, self.store_url, self.prefix)
            except psycopg.Error:
                return False
            return relay >= top

        async def drained() -> bool:
            for module_id in self.module_ids:
                stats = await transport.queue_stats(self.topology.module_queue(module_id))
                if stats is None or stats.messages:
                    return False
            return True

        async def settled() -> bool:
            return await published() and await drained()

        await wait_until(settled, timeout=timeout, what="the system to settle", every=0.2)
        await asyncio.sleep(0.5)  # a message in flight is in no queue's count
        await wait_until(settled, timeout=timeout, what="the system to settle", every=0.2)

    async def stop(self) -> None:
        """Modules, then every coordinator, gracefully; each must exit 0."""
        codes = await asyncio.gather(*(child.stop() for child in self.modules.values()))
        for (module_id, child), code in zip(self.modules.items(), codes, strict=True):
            assert code == 0, f"{module_id} exited with {code}:\n{child.output}"
        for child in self.coordinators:
            code = await child.stop()
            assert code == 0, f"{child.name} exited with {code}:\n{child.output}"

    async def store_positions(self) -> list[int]:
        """Each coordinator's projection position (``sessionbus_store_position`` from
        its /metrics): how far it has followed the shared log."""

        def scrape(port: int) -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                text = page.read().decode()
            match = re.search(r"^sessionbus_store_position (\S+)$", text, re.MULTILINE)
            assert match is not None, text
            return int(float(match.group(1)))

        ports = []
        for child in self.coordinators:
            ready = next(line for line in child.lines if "; ready" in line)
            found = re.search(r"metrics on :(\d+)/metrics", ready)
            assert found is not None, ready
            ports.append(int(found.group(1)))
        return [await asyncio.to_thread(scrape, port) for port in ports]

    async def wait_followed(self, timeout: float = 30.0) -> None:
        """Every coordinator's projections reach the last stored position: each one
        follows the shared log again after the database came back."""
        top, _ = await asyncio.to_thread(positions, self.store_url, self.prefix)

        async def followed() -> bool:
            return min(await self.store_positions()) >= top

        await wait_until(followed, timeout=timeout, what="every replica to follow the log")

    def output(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.output}" for c in self.coordinators)

    async def aclose(self) -> None:
        for child in self.coordinators:
            child.kill_now()
        await super().aclose()


@contextlib.asynccontextmanager
async def pg_system(
    url: str,
    prefix: str,
    directory: Path,
    module_ids: Sequence[str],
    *,
    store_url: str,
    coordinator_store: str | None = None,
    replicas: int = 1,
) -> AsyncIterator[PgSystem]:
    system = PgSystem(
        url,
        prefix,
        directory,
        module_ids,
        store_url=store_url,
        coordinator_store=coordinator_store or store_url,
        replicas=replicas,
        partitions=2 if replicas > 1 else 1,
    )
    try:
        await system.start()
        yield system
    finally:
        await system.aclose()


class PublishWatch:
    """Samples the relay's saved position every ``every`` seconds (while the database
    answers) to tell when publishing moved again after a moment."""

    def __init__(self, store_url: str, prefix: str, every: float = 0.1) -> None:
        self.store_url = store_url
        self.prefix = prefix
        self.every = every
        self.samples: list[tuple[float, int]] = []  # (monotonic, relay position)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PublishWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                _, relay = await asyncio.to_thread(positions, self.store_url, self.prefix)
                self.samples.append((time.monotonic(), relay))
            except psycopg.Error:
                pass  # the database is away
            await asyncio.sleep(self.every)

    def resumed_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first sample after it whose position is past
        every position sampled up to ``moment`` (publishing moved again)."""
        before = max((p for t, p in self.samples if t <= moment), default=0)
        later = [t for t, p in self.samples if t > moment and p > before]
        return min(later) - moment if later else None
