"""End to end, every party an OS process of its own: ``sessionctl coordinator`` on a
SQLite store, three module processes, and this test as the client driving a few
hundred workflow sessions through ACTIVE → COMPLETED → destroyed. Afterwards each
module must have applied every event of every session exactly once, in version order,
as the coordinator's store (read back after it stopped) has them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from contracts import REGISTRY_ID, SessionStatus, Topology
from coordinator.store.eventstore import EventStore
from module_sdk import CoordinatorClient
from module_sdk.testing import wait_for
from transport.amqp import AmqpTransport

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODULES = ("executor", "task-loop", "ai-integration")
SESSIONS = 300
CONCURRENCY = 32
S = SessionStatus


class Process:
    """A child process whose output is collected as it comes (so it never blocks on a
    full pipe) and which is stopped with SIGTERM."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(proc.stdout)),
            asyncio.create_task(self._pump(proc.stderr)),
        ]

    @classmethod
    async def start(cls, name: str, argv: list[str], *, ready: str) -> Process:
        env = {**os.environ, "SESSIONBUS_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        process = cls(name, proc)
        try:
            await wait_for(
                lambda: any(ready in line for line in process.lines) or proc.returncode is not None,
                timeout=30,
                what=f"{name} to be ready",
            )
        except TimeoutError as exc:
            raise AssertionError(f"{name} did not start:\n{process.output}") from exc
        if proc.returncode is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{process.output}")
        return process

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code (bounded wait)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._pumps)
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def bounded(items: Iterable[Any], call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """``call`` on every item, at most ``CONCURRENCY`` at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Any) -> Any:
        async with gate:
            return await call(item)

    return await asyncio.gather(*(one(item) for item in items))


async def count_with_status(client: CoordinatorClient, status: S) -> int:
    return len(await client.list_active_workflow_sessions(status=status))


async def poll(predicate: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    """Ask the coordinator (over the bus) until ``predicate`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


def store_versions(path: Path, sids: list[uuid.UUID]) -> dict[uuid.UUID, list[int]]:
    """Every session's versions as the coordinator's store has them."""
    with EventStore(f"sqlite:///{path}") as store:
        by_session: dict[uuid.UUID, list[int]] = {}
        for page in store.iter_all():
            for env in page:
                if env.session_id != REGISTRY_ID:
                    by_session.setdefault(env.session_id, []).append(env.version)
        assert set(by_session) == set(sids)
        for sid in sids:
            assert store.history(sid)[-1].type == "session.destroyed"
        return by_session


async def test_separate_processes_apply_every_event_exactly_once_in_version_order(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    test_id = request.node.nodeid
    store_path = tmp_path / "coordinator.sqlite"
    processes: list[Process] = []
    transport = AmqpTransport(amqp_url, connection_name=f"{test_id} client")
    try:
        coordinator = await Process.start(
            "coordinator",
            [
                str(BIN / "sessionctl"),
                "coordinator",
                "--amqp-url",
                amqp_url,
                "--store",
                f"sqlite:///{store_path}",
                "--prefix",
                prefix,
                "--identity",
                "guest=*",
            ],
            ready="; ready",
        )
        processes.append(coordinator)
        modules = {}
        for module_id in MODULES:
            modules[module_id] = await Process.start(
                module_id,
                [
                    sys.executable,
                    "-m",
                    "tests.support.module_process",
                    "--module-id",
                    module_id,
                    "--prefix",
                    prefix,
                    "--url",
                    amqp_url,
                    "--out",
                    str(tmp_path / f"{module_id}.json"),
                    "--connection-name",
                    f"{test_id} {module_id}",
                ],
                ready="ready",
            )
            processes.append(modules[module_id])

        await transport.connect()
        client = CoordinatorClient(transport, Topology(prefix), timeout=20)
        registered = {m.module_id: m.required for m in await client.list_modules()}
        assert registered == dict.fromkeys(MODULES, True)

        sessions = await bounded(
            range(SESSIONS), lambda i: client.create_workflow_session([f"step-{i}"])
        )
        sids = [s.session_id for s in sessions]
        await poll(
            lambda: _equals(count_with_status(client, S.ACTIVE), SESSIONS),
            timeout=40,
            what=f"{SESSIONS} sessions ACTIVE",
        )
        for session in await client.list_workflow_sessions():
            assert set(session.modules) == set(MODULES)

        await bounded(sids, lambda sid: client.update_session_status(sid, S.COMPLETED))
        assert await count_with_status(client, S.COMPLETED) == SESSIONS
        await bounded(sids, client.destroy_workflow_session)
        await poll(lambda: _equals(_live(client), 0), timeout=40, what="every session destroyed")

        # Everything is published, and every module queue is drained: what is left is
        # in the modules' hands, and a graceful close finishes it.
        async def published() -> bool:
            health = await client.get_coordinator_health()
            return health.published_position == health.store_position

        await poll(published, timeout=20, what="the relay to publish everything")
        topology = Topology(prefix)

        async def drained() -> bool:
            for module_id in MODULES:
                stats = await transport.queue_stats(topology.module_queue(module_id))
                if stats is None or stats.messages:
                    return False
            return True

        await poll(drained, timeout=20, what="the module queues to drain")

        for module_id, process in modules.items():
            code = await process.stop()
            assert code == 0, f"{module_id} exited with {code}:\n{process.output}"
        code = await coordinator.stop()
        assert code == 0, f"the coordinator exited with {code}:\n{coordinator.output}"
        assert "stopped" in coordinator.output
    finally:
        for process in processes:
            process.kill()
        with contextlib.suppress(Exception):
            await transport.close()

    expected = await asyncio.to_thread(store_versions, store_path, sids)
    for module_id in MODULES:
        result = json.loads((tmp_path / f"{module_id}.json").read_text())
        applied = {uuid.UUID(sid): versions for sid, versions in result["versions"].items()}
        assert set(applied) == set(sids), module_id
        wrong = {
            sid: (applied[sid], expected[sid]) for sid in sids if applied[sid] != expected[sid]
        }
        assert not wrong, f"{module_id} applied other versions than stored: {wrong}"
        assert all(v == list(range(1, len(v) + 1)) for v in expected.values())
        assert result["applied"] == sum(len(v) for v in expected.values())
        assert result["dead_lettered"] == result["requeued"] == 0
        assert len(result["made"]) == len(set(result["made"])) == SESSIONS
        assert sorted(result["destroyed"]) == sorted(result["made"])


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _live(client: CoordinatorClient) -> int:
    return len(await client.list_workflow_sessions())
