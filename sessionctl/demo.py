"""``sessionctl demo``: the coordinator, the seven reference modules and a stream of
sample workflow sessions, end to end, with a live view and a summary.

This and ``cli.py`` are the distribution's composition root: the only coordinator code
that imports the module SDK (to start the reference modules next to the coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from contracts import (
    ErrorCode,
    SessionStatus,
    StandardError,
    Topology,
    WorkflowConfig,
    verify_chain_raw,
)
from coordinator.domain.identity import IdentityMap
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk.client import CoordinatorClient
from module_sdk.errors import SdkError
from reference_modules import MODULES, ReferenceModule
from transport.amqp import AmqpTransport, redact_url
from transport.memory import MemoryBroker
from transport.port import Transport, TransportError

__all__ = ["DemoOptions", "run_demo"]

_S = SessionStatus
STEPS = ["open https://example.test", "log in", "search for 'sessionbus'", "open first result"]


@dataclass
class DemoOptions:
    amqp_url: str
    broker: str = "auto"  # auto | rabbitmq | memory
    sessions: int = 40
    concurrency: int = 8
    store: str | None = None
    keep_running: bool = False
    seed: int | None = None


@dataclass
class DemoResult:
    broker: str
    outcomes: Counter[str] = field(default_factory=Counter)
    events: int = 0
    published: int = 0
    seconds: float = 0.0
    chains_ok: int = 0
    chains_bad: int = 0
    integrity_ok: int = 0
    destroyed: list[uuid.UUID] = field(default_factory=list)  # whose chains are checked
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def _pick_broker(options: DemoOptions, console: Console) -> tuple[str, MemoryBroker | None]:
    if options.broker == "memory":
        return "memory", MemoryBroker()
    probe = AmqpTransport(
        options.amqp_url, connection_name="sessionbus-demo-probe", connect_timeout=3
    )
    quiet = logging.getLogger("aiormq.connection")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the answer is printed below, once
    try:
        await probe.connect()
    except TransportError as exc:
        if options.broker == "rabbitmq":
            raise
        console.print(
            f"[yellow]RabbitMQ is not reachable at {redact_url(options.amqp_url)} ({exc}).[/]\n"
            "[yellow]Running on the in-process bus instead (--broker memory).[/]"
        )
        return "memory", MemoryBroker()
    finally:
        quiet.setLevel(level)
        await probe.close()
    return "rabbitmq", None


async def _start_module_processes(
    url: str, topology: Topology
) -> dict[str, asyncio.subprocess.Process]:
    env = {**os.environ, "SESSIONBUS_LOG_LEVEL": "WARNING"}
    return {
        name: await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reference_modules",
            name,
            "--amqp-url",
            url,
            "--prefix",
            topology.prefix,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for name in MODULES
    }


_STOPPED = re.compile(
    r"^(?P<name>[a-z-]+): stopped; created (?P<c>\d+) sessions, cleaned up (?P<d>\d+)"
)


async def _stop_module_processes(
    processes: dict[str, asyncio.subprocess.Process],
) -> dict[str, tuple[int, int]]:
    """SIGTERM each module, wait (bounded) and read what it says it did."""
    figures: dict[str, tuple[int, int]] = {}
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for name, process in processes.items():
        try:
            _, err = await asyncio.wait_for(process.communicate(), 15)
        except TimeoutError:
            process.kill()
            _, err = await process.communicate()
        for line in (err or b"").decode(errors="replace").splitlines():
            match = _STOPPED.match(line)
            if match and match["name"] == name:
                figures[name] = (int(match["c"]), int(match["d"]))
    return figures


def _transport(kind: str, broker: MemoryBroker | None, url: str, name: str) -> Transport:
    if broker is not None:
        return broker.transport("guest")
    return AmqpTransport(url, connection_name=f"sessionbus-demo-{name}")


async def run_demo(options: DemoOptions, console: Console | None = None) -> DemoResult:
    """Run the demo; returns what happened (the CLI prints it)."""
    console = console or Console()
    rng = random.Random(options.seed)  # noqa: S311 - sample data, not secrets
    kind, broker = await _pick_broker(options, console)
    topology = Topology(f"demo-{uuid.uuid4().hex[:8]}")
    result = DemoResult(broker=kind)
    with contextlib.ExitStack() as stack:
        store = options.store
        if store is None:
            folder = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="sessionbus-demo-"))
            )
            store = f"sqlite:///{folder / 'events.sqlite'}"
        runtime = CoordinatorRuntime(
            _transport(kind, broker, options.amqp_url, "coordinator"),
            store=store,
            topology=topology,
            identity=IdentityMap.development_mode("guest"),
            health_interval=0.5,
        )
        started = time.perf_counter()
        async with runtime:
            processes: dict[str, asyncio.subprocess.Process] = {}
            modules: list[ReferenceModule] = []
            if kind == "rabbitmq":
                # Real module services: one OS process each, as in production.
                processes = await _start_module_processes(options.amqp_url, topology)
                registered = runtime.coordinator.projections.modules
                await _until(lambda: set(MODULES) <= set(registered), 60)
            else:
                modules = [
                    cls(
                        _transport(kind, broker, options.amqp_url, name),
                        topology=topology,
                        own_transport=True,
                        heartbeat_interval=0.5,
                    )
                    for name, cls in MODULES.items()
                ]
                for module in modules:
                    await module.start()
            frontend = _transport(kind, broker, options.amqp_url, "driver")
            await frontend.connect()
            client = CoordinatorClient(frontend, topology)
            try:
                await _drive(options, runtime, client, rng, result, console)
                if options.keep_running:
                    console.print("demo: keeping everything running; Ctrl-C to stop")
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.Event().wait()
                await runtime.wait_published(30)
                await _verify(runtime, result)
            finally:
                for module in modules:
                    result.modules[module.module_id] = (module.created_total, module.destroyed)
                    await module.close()
                result.modules.update(await _stop_module_processes(processes))
                await frontend.close()
        result.seconds = time.perf_counter() - started
        if kind == "rabbitmq":
            await _delete_topology(options.amqp_url, topology, list(MODULES))
    return result


async def _drive(
    options: DemoOptions,
    runtime: CoordinatorRuntime,
    client: CoordinatorClient,
    rng: random.Random,
    result: DemoResult,
    console: Console,
) -> None:
    coordinator = runtime.coordinator
    slots = asyncio.Semaphore(options.concurrency)
    done = 0

    async def one(index: int) -> None:
        nonlocal done
        async with slots:
            try:
                outcome = await _one_session(client, coordinator, rng, result.destroyed)
            except (SdkError, TimeoutError) as exc:
                outcome = "error"
                result.errors.append(f"session {index}: {exc}")
            result.outcomes[outcome] += 1
            done += 1

    tasks = [asyncio.create_task(one(i)) for i in range(options.sessions)]
    start_position = coordinator.projections.position
    last = (time.perf_counter(), start_position)
    rate = 0.0
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            position = coordinator.projections.position
            if now - last[0] >= 1.0:
                rate = (position - last[1]) / (now - last[0])
                last = (now, position)
            live.update(_view(runtime, done, options.sessions, rate))
        live.update(_view(runtime, done, options.sessions, rate))
    await asyncio.gather(*tasks)
    result.events = coordinator.projections.position


async def _one_session(
    client: CoordinatorClient,
    coordinator: object,
    rng: random.Random,
    destroyed: list[uuid.UUID],
) -> str:
    """One session through its life; its id is added to ``destroyed`` once it is."""

    assert isinstance(coordinator, SessionCoordinator)
    session = await client.create_workflow_session(
        STEPS, WorkflowConfig(link_timeout_ms=20_000, cleanup_timeout_ms=20_000)
    )
    sid = session.session_id
    await _until(lambda: _status(coordinator, sid) is not _S.INITIALIZING, 25)
    if _status(coordinator, sid) is not _S.ACTIVE:
        await client.destroy_workflow_session(sid, "did not become active")
        await _until(lambda: sid in coordinator.projections.recently_destroyed, 25)
        destroyed.append(sid)
        return "failed to activate"
    for _ in range(rng.randint(1, 3)):
        await client.record_activity(sid, "executor")
        await asyncio.sleep(rng.uniform(0.01, 0.05))
    roll = rng.random()
    if roll < 0.1:
        await client.update_session_status(sid, _S.PAUSED, reason="operator paused")
        await client.update_session_status(sid, _S.ACTIVE, reason="operator resumed")
    if roll < 0.8:
        await client.update_session_status(sid, _S.COMPLETED, reason="all steps done")
        outcome = "completed"
    elif roll < 0.9:
        await client.report_error(
            sid,
            StandardError(code=ErrorCode.MODULE_ERROR, message="simulated page crash"),
            module_id="executor",
        )
        outcome = "failed"
    else:
        await client.update_session_status(sid, _S.CANCELLED, reason="user cancelled")
        outcome = "cancelled"
    await client.destroy_workflow_session(sid, "demo finished")
    await _until(lambda: sid in coordinator.projections.recently_destroyed, 25)
    destroyed.append(sid)
    return outcome


def _status(coordinator: SessionCoordinator, sid: uuid.UUID) -> SessionStatus | None:
    session = coordinator.projections.sessions.get(sid)
    return session.status if session is not None else None


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo step not reached within {timeout} s")
        await asyncio.sleep(0.01)


def _view(runtime: CoordinatorRuntime, done: int, total: int, rate: float) -> Table:
    coordinator = runtime.coordinator
    proj = coordinator.projections
    table = Table(title=f"sessionbus demo — prefix {runtime.topology.prefix}", show_lines=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("sample sessions finished", f"{done} / {total}")
    for status, count in proj.status_counts().items():
        if count:
            table.add_row(f"  live {status.value}", str(count))
    table.add_row("  destroyed", str(proj.destroyed))
    table.add_row("events stored", str(proj.position))
    table.add_row("events published", str(runtime.relay.position if runtime.relay else 0))
    table.add_row("events / s", f"{rate:,.0f}")
    now = coordinator.clock.now()
    healthy = [m for m in sorted(proj.modules) if proj.is_healthy(m, now)]
    table.add_row("healthy modules", f"{len(healthy)} / {len(proj.modules)}")
    return table


async def _verify(runtime: CoordinatorRuntime, result: DemoResult) -> None:
    coordinator = runtime.coordinator
    store = coordinator.store
    assert store is not None
    result.published = runtime.relay.position if runtime.relay else 0
    for sid in result.destroyed:
        verdict = verify_chain_raw(await asyncio.to_thread(store.raw_history, sid))
        if verdict.ok:
            result.chains_ok += 1
        else:
            result.chains_bad += 1
        report = await coordinator.validate_session_integrity(sid)
        if not report.orphaned_sessions and not report.inconsistent_statuses:
            result.integrity_ok += 1


async def _delete_topology(url: str, topology: Topology, modules: list[str]) -> None:
    """The demo's queues go with it (its prefix is its own)."""
    names = [
        topology.audit_stream,
        topology.dead_letter_queue,
        topology.dead_letter_stream,
        topology.unroutable_queue,
        topology.commands_queue(),
        *(topology.module_queue(m) for m in modules),
    ]
    async with AmqpTransport(url, connection_name="sessionbus-demo-cleanup") as transport:
        for name in names:
            with contextlib.suppress(TransportError):
                await transport.delete_queue(name)


def summary_table(result: DemoResult) -> Table:
    table = Table(title="sessionbus demo — summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("broker", result.broker)
    for outcome, count in sorted(result.outcomes.items()):
        table.add_row(f"sessions {outcome}", str(count))
    table.add_row("events stored / published", f"{result.events} / {result.published}")
    table.add_row("hash chains verified", f"{result.chains_ok} ok, {result.chains_bad} bad")
    table.add_row("sessions clean (no orphans)", str(result.integrity_ok))
    for module_id, (created, destroyed) in sorted(result.modules.items()):
        table.add_row(f"  {module_id}", f"{created} created, {destroyed} cleaned up")
    table.add_row("elapsed", f"{result.seconds:.1f} s")
    return table
