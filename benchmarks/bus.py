"""sessionbus over the real broker: the coordinator and the modules as OS processes.

Every measurement runs against RabbitMQ at ``SESSIONBUS_TEST_AMQP_URL`` under a prefix of
its own (``bench-bus-<hex6>``, deleted afterwards, on error too), with a SQLite store in
a fresh directory, real ``sessionctl coordinator`` processes and module processes:

- ``bus.commands``: commands/s through one coordinator process (store, publish, reply)
  from a ``CoordinatorClient`` in this process, at 1 and 64 in flight.
- ``bus.delivered``: a backlog committed straight into the store (in-process
  ``SessionCoordinator``, no broker), then the coordinator process's outbox relay
  publishes it to one, then seven, module processes; first applied → last applied.
- ``bus.fanout``: commands paced by a schedule at a fixed event rate; latency from each
  event's commit to its application in each of seven module processes.
- ``bus.sessions``: whole workflow sessions with the seven reference modules.

A module's queue is bound to every session event (``session.#``), whether or not the
module linked the session: every module receives every event of every session. The
module processes of ``delivered`` and ``fanout`` run ``python -m benchmarks.bus --module
ID``: a ``SessionManager`` subclass that takes part in no session (so it sends no
commands back) and consumes its own quorum queue through the SDK's consumer (acks,
per-session order, dedupe by version), recording what it applied and when; the parent
checks that each applied every committed event once and in order.

Beside each rate: CPU milliseconds per event (or command, or session) of each party
(coordinator, modules, broker, this process), how long the coordinator waited for a
CPU while runnable, and how busy the whole machine was: on a small shared machine
these say where the time went.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cpu import CpuMeter, CpuUse, cpu_figures
from benchmarks.pacing import open_loop
from benchmarks.registry import (
    Context,
    Deadline,
    Figure,
    Trial,
    measurement,
    percentile,
    ratio,
    target,
)
from contracts import (
    REGISTRY_ID,
    CreateWorkflowSession,
    Destroyed,
    EventEnvelope,
    SessionStatus,
    StatusChanged,
    Topology,
    WorkflowConfig,
    WorkflowSession,
    codec_for,
    new_id,
)
from contracts.topology import QueueSpec
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.relay import OutboxRelay
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient, SessionManager
from reference_modules import MODULES as REFERENCE_MODULES
from transport.amqp import AmqpTransport
from transport.port import Delivery, TransportError
from transport.topology import declare_topology

_S = SessionStatus
AMQP = os.environ.get("SESSIONBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MANAGEMENT = os.environ.get("SESSIONBUS_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")
SESSIONCTL = str(Path(sys.executable).with_name("sessionctl"))
ROOT = Path(__file__).resolve().parent.parent
BENCH_MODULES = tuple(f"bench-{i}" for i in range(1, 8))
STOP_GRACE_S = 20.0
START_TIMEOUT_S = 60.0


# --- processes ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (a watchdog exit must not
    leave coordinators and modules running)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_env() -> dict[str, str]:
    # Nothing of the caller's sessionbus settings leaks into the children: every
    # setting they get is on their command line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
    env["SESSIONBUS_LOG_LEVEL"] = "WARNING"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class Child:
    """One OS process of a measurement. Its output is read all the time (a full pipe
    would stall it); the last lines are kept for the error message."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, ready: str) -> None:
        self.name = name
        self.process = process
        self.ready_marker = ready
        self.lines: deque[str] = deque(maxlen=60)
        self.applied = 0  # bench modules: the last "applied N" they printed
        self.ready = asyncio.Event()
        self.stopped_line: str | None = None
        self.pid = process.pid
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(process.stdout)),
            asyncio.create_task(self._read(process.stderr)),
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if text.startswith("applied "):
                self.applied = int(text.split()[1])
                continue
            self.lines.append(text)
            if self.ready_marker in text:
                self.ready.set()
            if ": stopped;" in text:
                self.stopped_line = text

    def tail(self) -> str:
        return "\n".join(self.lines) or "(no output)"

    async def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        waiter = asyncio.create_task(self.ready.wait())
        exited = asyncio.create_task(self.process.wait())
        done, _ = await asyncio.wait(
            {waiter, exited}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        waiter.cancel()
        exited.cancel()
        if waiter not in done:
            why = "exited" if exited in done else f"not ready within {timeout:.0f} s"
            raise RuntimeError(f"{self.name} {why}; its output:\n{self.tail()}")

    async def stop(self) -> int:
        """SIGTERM, wait (bounded), SIGKILL if it has to be."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
                self.lines.append(f"(killed after {STOP_GRACE_S:.0f} s without exiting)")
        _, unfinished = await asyncio.wait(self._readers, timeout=5)
        for reader in unfinished:  # a grandchild holding the pipe open
            reader.cancel()
        code = self.process.returncode
        assert code is not None
        return code


async def _spawn(name: str, argv: list[str], ready: str) -> Child:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
        cwd=ROOT,
        preexec_fn=_die_with_parent,  # only prctl: nothing that could deadlock
    )
    return Child(name, process, ready)


# --- the broker side of a measurement -------------------------------------------------


def _management(method: str, path: str) -> Any:
    base = urllib.parse.urlsplit(MANAGEMENT)
    url = urllib.parse.urlunsplit(
        base._replace(netloc=f"{base.hostname}:{base.port or 15672}", path=path)
    )
    request = urllib.request.Request(url, method=method)  # noqa: S310 - the local broker
    auth = f"{base.username or 'guest'}:{base.password or 'guest'}"
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        body = response.read()
    return json.loads(body) if body else None


def _delete_prefix_management(prefix: str) -> int:
    """Delete every queue and exchange named ``<prefix>.*``; how many."""
    deleted = 0
    for kind in ("queues", "exchanges"):
        for item in _management("GET", f"/api/{kind}/%2F?columns=name"):
            name = str(item["name"])
            if name.startswith(prefix + "."):
                quoted = urllib.parse.quote(name, safe="")
                with contextlib.suppress(urllib.error.HTTPError):
                    _management("DELETE", f"/api/{kind}/%2F/{quoted}")
                    deleted += 1
    return deleted


class Harness:
    """A prefix of one's own on the broker, the processes started under it, and a
    client transport; ``close`` stops the processes, then deletes the prefix."""

    def __init__(self, ctx: Context, label: str) -> None:
        self.ctx = ctx
        self.prefix = f"bench-bus-{uuid.uuid4().hex[:6]}"
        self.topology = Topology(self.prefix, 1)
        self.dir = ctx.tmpdir(f"bus-{label}-")
        self.transport = AmqpTransport(AMQP, connection_name=f"{self.prefix} bench")
        self.client = CoordinatorClient(self.transport, self.topology, timeout=10)
        self.children: list[Child] = []  # running
        self.started: list[Child] = []
        ctx.params["prefix"] = self.prefix

    async def open(self) -> None:
        await self.transport.connect()
        # What the coordinator would declare, declared before any process starts: module
        # queues bind to the events exchange, so modules may start before the
        # coordinator (identical arguments, so its own declaration is a no-op).
        await declare_topology(self.transport, self.topology)

    async def coordinator(self, store: Path) -> Child:
        child = await _spawn(
            "coordinator",
            [
                SESSIONCTL,
                "coordinator",
                "--amqp-url",
                AMQP,
                "--store",
                f"sqlite:///{store}",
                "--prefix",
                self.prefix,
                "--partitions",
                "1",
                "--identity",
                "guest=*",
            ],
            "; ready",
        )
        self.children.append(child)
        self.started.append(child)
        return child

    async def sessions(self, count: int) -> list[uuid.UUID]:
        """``count`` workflow sessions created at once through the client; their ids."""
        made = await asyncio.gather(
            *(self.client.create_workflow_session(["bench"]) for _ in range(count))
        )
        return [s.session_id for s in made]

    async def bench_module(self, module_id: str, out: Path) -> Child:
        child = await _spawn(
            module_id,
            [
                sys.executable,
                "-m",
                "benchmarks.bus",
                "--module",
                module_id,
                "--prefix",
                self.prefix,
                "--amqp-url",
                AMQP,
                "--out",
                str(out),
            ],
            "ready",
        )
        self.children.append(child)
        self.started.append(child)
        return child

    async def reference_module(self, name: str) -> Child:
        child = await _spawn(
            name,
            [
                sys.executable,
                "-m",
                "reference_modules",
                name,
                "--amqp-url",
                AMQP,
                "--prefix",
                self.prefix,
            ],
            f"{name}: ready on prefix",
        )
        self.children.append(child)
        self.started.append(child)
        return child

    async def stop(self, *children: Child) -> None:
        await asyncio.gather(*(c.stop() for c in children))
        for c in children:
            self.children.remove(c)

    async def close(self) -> None:
        try:
            await self.stop(*self.children)
        finally:
            await self.transport.close()
            await asyncio.to_thread(self.delete_prefix)

    def delete_prefix(self) -> None:
        try:
            _delete_prefix_management(self.prefix)
        except (urllib.error.URLError, OSError) as exc:
            # No management API: the names this code knows, over AMQP.
            self.ctx.note(f"{self.prefix}: management API unreachable ({exc}); known queues only")
            asyncio.run(self._delete_known_queues())

    async def _delete_known_queues(self) -> None:
        names = [
            *self.topology.command_queues(),
            self.topology.audit_stream,
            self.topology.dead_letter_queue,
            self.topology.dead_letter_stream,
            self.topology.unroutable_queue,
            *(self.topology.module_queue(m) for m in (*BENCH_MODULES, *REFERENCE_MODULES)),
        ]
        async with AmqpTransport(AMQP, connection_name=f"{self.prefix} cleanup") as transport:
            for name in names:
                with contextlib.suppress(TransportError):
                    await transport.delete_queue(name)


@contextlib.contextmanager
def _harness(ctx: Context, label: str) -> Iterator[tuple[asyncio.AbstractEventLoop, Harness]]:
    """One event loop for the set-up, every trial and the clean-up."""
    loop = asyncio.new_event_loop()
    harness = Harness(ctx, label)
    try:
        loop.run_until_complete(harness.open())
        yield loop, harness
    except BaseException:
        for child in harness.started:  # what the processes said, for the failure
            ctx.log(f"{child.name} (pid {child.pid}), last lines:")
            for line in list(child.lines)[-15:]:
                ctx.log(f"  {line}")
        raise
    finally:
        try:
            loop.run_until_complete(harness.close())
        finally:
            loop.close()


async def _until(
    predicate: Callable[[], bool], timeout: float, alive: Sequence[Child] = ()
) -> bool:
    """Poll ``predicate`` (cheap) until it holds; False at the timeout. A process of
    ``alive`` that exits meanwhile ends the wait with its output."""
    deadline = Deadline(timeout)
    while not predicate():
        if deadline.passed():
            return False
        for child in alive:
            if child.process.returncode is not None:
                raise RuntimeError(
                    f"{child.name} exited ({child.process.returncode}); its output:\n"
                    + child.tail()
                )
        await asyncio.sleep(0.02)
    return True


# --- bus.commands ---------------------------------------------------------------------


def _seconds(ctx: Context, in_flight: int) -> float:
    if in_flight == 1:
        return 1.5 if ctx.quick else 4.0
    return 2.0 if ctx.quick else 6.0


async def _commands_level(h: Harness, lanes: list[uuid.UUID], seconds: float) -> dict[str, float]:
    """Each lane: its own session, three activity records then a status toggle
    (PAUSED, then back to ACTIVE next round), one command at a time."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def lane(sid: uuid.UUID) -> None:
        paused = False
        for n in range(1_000_000):  # bounded by count and by time
            if time.perf_counter() >= stop_at:
                return
            started = time.perf_counter()
            if n % 4 == 3:
                paused = not paused
                await h.client.update_session_status(sid, _S.PAUSED if paused else _S.ACTIVE)
            else:
                await h.client.record_activity(sid)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(lane(sid) for sid in lanes))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "commands": len(latencies),
        "per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


@measurement(
    "bus.commands",
    "commands/s through a coordinator process (SQLite, store+publish+reply), 1 and 64 in flight",
    repeats=(2, 3),
    budget_s=(20.0, 90.0),
)
@contextlib.contextmanager
def bus_commands(ctx: Context) -> Iterator[Trial]:
    levels = (1, 64)
    with _harness(ctx, "commands") as (loop, h):

        async def setup() -> tuple[Child, list[uuid.UUID]]:
            coordinator = await h.coordinator(h.dir / "store.sqlite")
            await coordinator.wait_ready()
            ids = await h.sessions(max(levels))
            await _commands_level(h, ids, 0.5)  # warm-up: first-use costs are not measured
            return coordinator, ids

        coordinator, sessions = loop.run_until_complete(setup())
        ctx.params.update(
            in_flight_levels=list(levels),
            seconds_per_level={str(n): _seconds(ctx, n) for n in levels},
            mix="per lane (own ACTIVE session, no module linked): 3 record_activity then 1 "
            "update_session_status toggling PAUSED/ACTIVE; 1 event per command",
            store="SQLite file (fresh directory)",
            partitions=1,
            consumers_of_events="audit stream only (no module queue)",
        )

        async def trial() -> dict[str, Figure]:
            figures: dict[str, Figure] = {}
            for n in levels:
                meter = CpuMeter({"coordinator": [coordinator.pid]})
                got = await _commands_level(h, sessions[:n], _seconds(ctx, n))
                use = meter.stop()
                figures[f"inflight_{n}.commands_per_s"] = Figure(got["per_s"], "cmd/s")
                figures[f"inflight_{n}.p50_ms"] = Figure(got["p50_ms"], "ms", "lower")
                figures[f"inflight_{n}.p99_ms"] = Figure(got["p99_ms"], "ms", "lower")
                if n > 1:
                    figures |= cpu_figures(f"inflight_{n}.", use, got["commands"], "command")
            return figures

        yield lambda: loop.run_until_complete(trial())


ratio(
    "commands_vs_raw_rpc_64",
    ("bus.commands", "inflight_64.commands_per_s"),
    ("rawbus.rpc", "inflight_64.req_per_s"),
    "commands through the coordinator vs raw aio-pika RPC, 64 in flight (target >= 0.8)",
    paired=True,
)
ratio(
    "commands_vs_raw_rpc_64_quorum",
    ("bus.commands", "inflight_64.commands_per_s"),
    ("rawbus.rpc", "quorum.inflight_64.req_per_s"),
    "the same against raw RPC on a quorum request queue, as the coordinator's commands queue is",
    paired=True,
)
ratio(
    "vs_naive_peer",
    ("bus.pipeline", "events_per_s"),
    ("rawbus.naive_peer", "commands_per_s"),
    "commands stored and published (confirmed) per second by the coordinator's group "
    "commit and outbox relay vs a naive peer that saves then publishes and awaits the "
    "confirm per command; neither side has a request/reply hop (target >= 10)",
    paired=True,
)
ratio(
    "vs_naive_peer_over_rpc",
    ("bus.commands", "inflight_64.commands_per_s"),
    ("rawbus.naive_peer", "commands_per_s"),
    "commands through the coordinator process over RPC (store+publish+reply), 64 in "
    "flight, vs the naive peer (which has no reply to send)",
)


async def _pipeline_level(
    coordinator: SessionCoordinator, relay: OutboxRelay, lanes: list[uuid.UUID], seconds: float
) -> dict[str, float]:
    """Every lane records activity on its own session, one command at a time, for
    ``seconds``; then the clock runs on until the relay has every event confirmed."""
    store = coordinator.store
    assert store is not None
    start_position = await asyncio.to_thread(store.max_position)
    stop_at = time.perf_counter() + seconds
    commands = 0

    async def lane(sid: uuid.UUID) -> None:
        nonlocal commands
        for _ in range(1_000_000):  # bounded by count and by time
            if time.perf_counter() >= stop_at:
                return
            await coordinator.record_activity(sid)
            commands += 1

    began = time.perf_counter()
    await asyncio.gather(*(lane(sid) for sid in lanes))
    end_position = await asyncio.to_thread(store.max_position)
    await _until(lambda: relay.position >= end_position, 60.0)
    elapsed = time.perf_counter() - began
    if relay.position < end_position:
        raise RuntimeError(f"relay at {relay.position}, store at {end_position} after 60 s")
    return {"events": end_position - start_position, "commands": commands, "seconds": elapsed}


@measurement(
    "bus.pipeline",
    "commands applied in process, group-committed to SQLite and published confirmed by the "
    "outbox relay to RabbitMQ (no request/reply hop): the naive peer's work, done our way",
    repeats=(2, 3),
    budget_s=(15.0, 60.0),
)
@contextlib.contextmanager
def bus_pipeline(ctx: Context) -> Iterator[Trial]:
    in_flight = 256
    seconds = 2.0 if ctx.quick else 5.0
    with _harness(ctx, "pipeline") as (loop, h):
        runtime = CoordinatorRuntime(
            h.transport,
            store=f"sqlite:///{h.dir / 'pipeline.sqlite'}",
            topology=h.topology,
            own_transport=False,
        )

        async def setup() -> list[uuid.UUID]:
            await runtime.start()
            await runtime.server.stop()  # commands come from this process, not the queue
            if not await _until(lambda: runtime.relay is not None, 30.0):
                raise RuntimeError("the coordinator did not become the store's leader")
            sessions = await asyncio.gather(
                *(runtime.coordinator.create_workflow_session(["bench"]) for _ in range(in_flight))
            )
            await runtime.wait_published()
            return [s.session_id for s in sessions]

        try:
            sessions = loop.run_until_complete(setup())
            ctx.params.update(
                in_flight=in_flight,
                seconds=seconds,
                mix="record_activity on its own ACTIVE session per lane; 1 event per command",
                store="SQLite file (fresh directory)",
                published_to="events exchange → audit stream (no module queue)",
            )

            async def trial() -> dict[str, Figure]:
                assert runtime.relay is not None
                got = await _pipeline_level(runtime.coordinator, runtime.relay, sessions, seconds)
                return {
                    "events_per_s": Figure(got["events"] / got["seconds"], "events/s"),
                    "commands_per_s": Figure(got["commands"] / got["seconds"], "cmd/s"),
                }

            yield lambda: loop.run_until_complete(trial())
        finally:
            loop.run_until_complete(runtime.close())


# --- what bench modules applied -------------------------------------------------------


async def _write_backlog(store: Path, sessions: int) -> dict[str, int]:
    """Commit ``sessions`` whole lives straight into the store with an in-process
    coordinator (no broker): created, ACTIVE (no module required), five activity
    records, PAUSED, ACTIVE, CLEANUP, destroyed; eleven events each. Returns each
    session's final version, read back from the store."""
    coordinator = SessionCoordinator(f"sqlite:///{store}")
    await coordinator.start()
    try:
        gate = asyncio.Semaphore(256)

        async def life() -> uuid.UUID:
            async with gate:
                sid = (await coordinator.create_workflow_session(["bench"])).session_id
                for _ in range(5):
                    await coordinator.record_activity(sid)
                await coordinator.update_session_status(sid, _S.PAUSED)
                await coordinator.update_session_status(sid, _S.ACTIVE)
                await coordinator.destroy_workflow_session(sid, "bench done")
                return sid

        ids = await asyncio.gather(*(life() for _ in range(sessions)))
        assert coordinator.store is not None
        es = coordinator.store
        return await asyncio.to_thread(lambda: {str(s): len(es.raw_history(s)) for s in ids})
    finally:
        await coordinator.close()


@dataclass
class Applied:
    """What one module applied of a set of sessions, against what was committed."""

    events: int = 0  # distinct (session, version) applied
    missing: int = 0  # committed, never applied
    extra: int = 0  # applied twice, or a version never committed
    disordered: int = 0  # sessions whose versions were not applied in order
    first: float = float("inf")  # time.time() of the first and last application
    last: float = float("-inf")

    @property
    def wrong(self) -> int:
        return self.missing + self.extra + self.disordered


def _applied(report: dict[str, Any], expected: dict[str, int]) -> Applied:
    got = Applied()
    versions: dict[str, list[int]] = report["versions"]
    spans: dict[str, list[float]] = report["spans"]
    for sid, final in expected.items():
        seen = versions.get(sid, [])
        wanted = set(range(1, final + 1))
        distinct = set(seen) & wanted
        got.events += len(distinct)
        got.missing += len(wanted - distinct)
        got.extra += len(seen) - len(distinct)
        got.disordered += seen != sorted(seen)
        if sid in spans:
            got.first = min(got.first, spans[sid][0])
            got.last = max(got.last, spans[sid][1])
    return got


def _read_report(child: Child, out: Path) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"{child.name} wrote no report ({exc}); its output:\n{child.tail()}"
        ) from exc
    return report


def _check(
    ctx: Context, what: str, applied: dict[str, Applied], reports: list[dict[str, Any]]
) -> int:
    """Note every module that did not apply exactly what was committed, once and in
    order; returns how many events were wrong in all."""
    wrong = 0
    for module_id, a in applied.items():
        if a.wrong:
            wrong += a.wrong
            ctx.note(
                f"{what}: {module_id} LOST {a.missing} events, applied {a.extra} extra, "
                f"{a.disordered} sessions out of order"
            )
    for report in reports:
        stats = report["stats"]
        unusual = {k: stats[k] for k in ("gaps_filled", "dead_lettered", "requeued") if stats[k]}
        if unusual:
            ctx.note(f"{what}: {report['module_id']} {unusual}")
    return wrong


async def _delete_module_queues(h: Harness, modules: tuple[str, ...]) -> None:
    # A stopped module's queue would keep receiving events: every phase starts with
    # exactly the queues of its own modules.
    for module_id in modules:
        with contextlib.suppress(TransportError):
            await h.transport.delete_queue(h.topology.module_queue(module_id))


# --- bus.delivered --------------------------------------------------------------------


async def _relay_to(
    h: Harness, store: Path, want: dict[Child, int], timeout: float
) -> tuple[bool, CpuUse]:
    """Start a coordinator on ``store`` (its relay publishes what the store holds past
    its tracked position), wait until each module applied its count, stop it. Whether
    all arrived, and the CPU each party used from the coordinator's ready to then."""
    began = time.perf_counter()
    coordinator = await h.coordinator(store)
    try:
        await coordinator.wait_ready()
        ready = time.perf_counter()
        meter = CpuMeter(
            {"coordinator": [coordinator.pid], "modules": [c.pid for c in want]}, bench=False
        )
        done = await _until(
            lambda: all(c.applied >= n for c, n in want.items()), timeout, [coordinator, *want]
        )
        h.ctx.log(
            f"{len(want)} module(s): coordinator ready in {ready - began:.1f}s, "
            f"every event applied {time.perf_counter() - ready:.1f}s later"
        )
        return done, meter.stop()
    finally:
        await h.stop(coordinator)


@measurement(
    "bus.delivered",
    "committed backlog → applied in 1 and in 7 module processes (outbox relay, SDK consumer)",
    repeats=(1, 2),
    budget_s=(30.0, 200.0),
)
@contextlib.contextmanager
def bus_delivered(ctx: Context) -> Iterator[Trial]:
    sessions = ctx.size(200, 600)
    timeout = 30.0 + sessions * 11 / 100  # far beyond any plausible rate
    ctx.params.update(
        sessions_per_phase=sessions,
        events_per_session=11,
        life="created, ACTIVE, 5 activity, PAUSED, ACTIVE, CLEANUP, destroyed",
        modules="bench module processes: SessionManager joining no session, own quorum queue",
        timing="first event applied (any module) to last applied (all modules), time.time()",
        phases="one module: backlog A; then six more start and backlog B is published to seven "
        "(the first module gets both)",
    )
    with _harness(ctx, "delivered") as (loop, h):
        trials = 0

        async def trial() -> dict[str, Figure]:
            nonlocal trials
            trials += 1
            store = h.dir / f"store-{trials}.sqlite"
            outs = {m: h.dir / f"{m}-{trials}.json" for m in BENCH_MODULES}
            first = await h.bench_module(BENCH_MODULES[0], outs[BENCH_MODULES[0]])
            modules = [first]
            try:
                began = time.perf_counter()
                a = await _write_backlog(store, sessions)  # while the module starts
                ctx.log(
                    f"backlog of {sum(a.values())} events in {time.perf_counter() - began:.1f}s"
                )
                await first.wait_ready()
                total_a = sum(a.values())
                done_a, cpu_a = await _relay_to(h, store, {first: total_a}, timeout)
                modules += [await h.bench_module(m, outs[m]) for m in BENCH_MODULES[1:]]
                b = await _write_backlog(store, sessions)
                await asyncio.gather(*(m.wait_ready() for m in modules))
                total_b = sum(b.values())
                want = dict.fromkeys(modules, total_b) | {first: total_a + total_b}
                done_b, cpu_b = await _relay_to(h, store, want, timeout)
            finally:
                await h.stop(*modules)
                await _delete_module_queues(h, BENCH_MODULES)
            reports = {m.name: _read_report(m, outs[m.name]) for m in modules}
            one = {first.name: _applied(reports[first.name], a)}
            seven = {name: _applied(r, b) for name, r in reports.items()}
            if not done_a or not done_b:
                ctx.note(f"trial {trials}: not every event applied within {timeout:.0f} s")
            wrong_one = _check(ctx, f"trial {trials}, one module", one, [])
            wrong_seven = _check(
                ctx, f"trial {trials}, seven modules", seven, list(reports.values())
            )
            o = one[first.name]
            window = max(x.last for x in seven.values()) - min(x.first for x in seven.values())
            deliveries = sum(x.events for x in seven.values())
            return {
                "one_module.events_per_s": Figure(o.events / (o.last - o.first), "events/s"),
                "one_module.wrong_events": Figure(wrong_one, "events", "lower"),
                "seven_modules.events_per_s": Figure(deliveries / 7 / window, "events/s"),
                "seven_modules.deliveries_per_s": Figure(deliveries / window, "deliveries/s"),
                "seven_modules.wrong_events": Figure(wrong_seven, "events", "lower"),
                "events_per_phase": Figure(total_b, "events", None),
                **cpu_figures("one_module.", cpu_a, total_a, "event"),
                **cpu_figures("seven_modules.", cpu_b, total_b, "event"),
            }

        yield lambda: loop.run_until_complete(trial())


ratio(
    "delivered_vs_raw_e2e",
    ("bus.delivered", "one_module.events_per_s"),
    ("rawbus.e2e", "msgs_per_s"),
    "committed events delivered to a module vs raw aio-pika publish→consume across two "
    "processes (target >= 0.6)",
    paired=True,
)


# --- bus.fanout -----------------------------------------------------------------------


@dataclass
class Paced:
    wall: float  # time.time() at the start of the schedule
    scheduled: int
    sent: int = 0
    failed: int = 0
    behind_s: float = 0.0  # how far behind its due time the latest send was
    seconds: float = 0.0  # from the start to the last reply
    per_session: dict[str, int] = field(default_factory=dict)  # activity recorded


async def _paced(h: Harness, sessions: list[uuid.UUID], rate: float, seconds: float) -> Paced:
    """``record_activity`` (one event each) round-robin over ``sessions`` on an open-loop
    schedule (``benchmarks.pacing``)."""
    got = Paced(time.time(), int(rate * seconds))
    got.per_session = {str(s): 0 for s in sessions}
    last_reply = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal last_reply
        sid = sessions[i % len(sessions)]
        try:
            await h.client.record_activity(sid)
        except Exception:  # noqa: BLE001 - counted and reported
            got.failed += 1
            return
        got.per_session[str(sid)] += 1
        last_reply = time.perf_counter()

    schedule = await open_loop(got.scheduled, rate, seconds, one)
    got.sent, got.behind_s = schedule.sent, schedule.behind_s
    got.failed += schedule.late
    got.seconds = last_reply - schedule.started
    return got


@measurement(
    "bus.fanout",
    "commit → applied latency in 1, then in 7 module processes at a fixed event rate (paced "
    "schedule); unprefixed figures are the seven modules'",
    repeats=(1, 2),
    budget_s=(40.0, 200.0),
)
@contextlib.contextmanager
def bus_fanout(ctx: Context) -> Iterator[Trial]:
    rate = float(ctx.size(250, 1000))
    seconds = 3.0 if ctx.quick else 8.0
    lanes = 32
    ctx.params.update(
        target_events_per_s=rate,
        seconds=seconds,
        sessions=lanes,
        modules=len(BENCH_MODULES),
        command="record_activity round-robin over pre-created ACTIVE sessions, 1 event each",
        latency="from EventEnvelope.occurred_at (stamped by the coordinator as it applies the "
        "command, before the group commit: the commit is included) to the end of the "
        "module's apply, both time.time() on this machine; every event in every module",
    )
    with _harness(ctx, "fanout") as (loop, h):
        trials = 0

        async def run(module_ids: tuple[str, ...], label: str) -> dict[str, Figure]:
            outs = {m: h.dir / f"fanout-{m}-{label}-{trials}.json" for m in module_ids}
            coordinator = await h.coordinator(h.dir / f"fanout-{label}-{trials}.sqlite")
            modules = [await h.bench_module(m, outs[m]) for m in module_ids]
            try:
                await asyncio.gather(*(c.wait_ready() for c in (coordinator, *modules)))
                ids = await h.sessions(lanes)
                alive = [coordinator, *modules]
                await _until(lambda: all(m.applied >= 2 * lanes for m in modules), 30, alive)
                meter = CpuMeter(
                    {"coordinator": [coordinator.pid], "modules": [m.pid for m in modules]}
                )
                paced = await _paced(h, ids, rate, seconds)
                expected = {sid: 2 + n for sid, n in paced.per_session.items()}
                total = sum(expected.values())
                if not await _until(lambda: all(m.applied >= total for m in modules), 30, alive):
                    ctx.note(f"trial {trials} ({label}): not every event applied within 30 s")
                cpu = meter.stop()
            finally:
                await h.stop(*modules)
                await h.stop(coordinator)
                await _delete_module_queues(h, module_ids)
            reports = [_read_report(m, outs[m.name]) for m in modules]
            applied = {r["module_id"]: _applied(r, expected) for r in reports}
            wrong = _check(ctx, f"trial {trials} ({label})", applied, reports)
            if paced.failed:
                ctx.note(
                    f"trial {trials} ({label}): {paced.failed} commands failed or went unanswered"
                )
            latencies = sorted(
                (a - o) * 1000 for r in reports for o, a in r["pairs"] if o >= paced.wall
            )
            events = sum(paced.per_session.values())
            achieved = events / paced.seconds if paced.seconds > 0 else 0.0
            if achieved < 0.95 * rate:
                ctx.note(
                    f"trial {trials} ({label}): target rate {rate:.0f} events/s not reached: "
                    f"{achieved:.0f} events/s achieved, {paced.sent} of {paced.scheduled} "
                    f"commands sent, up to {paced.behind_s:.2f} s behind their due time"
                )
            return {
                "p50_ms": Figure(percentile(latencies, 0.5), "ms", "lower"),
                "p99_ms": Figure(percentile(latencies, 0.99), "ms", "lower"),
                "max_ms": Figure(latencies[-1] if latencies else float("nan"), "ms", "lower"),
                "achieved_events_per_s": Figure(achieved, "events/s"),
                "sends_behind_schedule_max_ms": Figure(paced.behind_s * 1000, "ms", "lower"),
                "deliveries": Figure(len(latencies), "deliveries", None),
                "wrong_events": Figure(wrong, "events", "lower"),
                **cpu_figures("", cpu, events, "event"),
            }

        async def trial() -> dict[str, Figure]:
            nonlocal trials
            trials += 1
            one = await run(BENCH_MODULES[:1], "one module")
            seven = await run(BENCH_MODULES, "seven modules")
            return {**{f"one_module.{k}": v for k, v in one.items()}, **seven}

        yield lambda: loop.run_until_complete(trial())


target("fan-out p99 at 1k events/s", "bus.fanout", "p99_ms", "<=", 5, "ms")
ratio(
    "fanout_p99_vs_raw",
    ("bus.fanout", "p99_ms"),
    ("rawbus.fanout", "p99_ms"),
    "fan-out p99 to seven modules (commit → applied) vs raw aio-pika publish → consume "
    "into seven quorum queues at the same rate (lower is better; 1 = the broker's floor)",
)
ratio(
    "fanout_p99_vs_raw_one",
    ("bus.fanout", "one_module.p99_ms"),
    ("rawbus.fanout", "one_queue.p99_ms"),
    "the same with one module and one queue",
)


# --- bus.sessions ---------------------------------------------------------------------


@dataclass
class _Watch:
    active: asyncio.Event = field(default_factory=asyncio.Event)
    destroyed: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None
    orphaned: dict[str, Any] = field(default_factory=dict)


class Observer:
    """Follows the sessions' status changes and destructions on a queue of its own (as a
    front end would), so no one polls the coordinator."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.queue = f"{h.prefix}.bench-observer"
        self.watches: dict[uuid.UUID, _Watch] = {}

    async def start(self) -> None:
        exchange = self.h.topology.events_exchange
        await self.h.transport.declare_queue(
            QueueSpec(
                self.queue,
                durable=False,
                exclusive=True,
                auto_delete=True,
                bindings=[(exchange, "session.status-changed"), (exchange, "session.destroyed")],
            )
        )
        await self.h.transport.consume(self.queue, self._on_delivery, prefetch=512)

    def watch(self, sid: uuid.UUID) -> _Watch:
        return self.watches.setdefault(sid, _Watch())

    async def _on_delivery(self, delivery: Delivery) -> None:
        env: EventEnvelope = codec_for(delivery.content_type).decode_envelope(delivery.body)
        event = env.event
        w = self.watch(env.session_id)
        if isinstance(event, StatusChanged) and event.module_id is None:
            if event.new_status is _S.ACTIVE:
                w.active.set()
            elif event.new_status is _S.FAILED:
                w.failure = event.reason or "FAILED"
                w.active.set()
        elif isinstance(event, Destroyed):
            w.orphaned = {k: str(v) for k, v in event.orphaned.items()}
            w.destroyed.set()
        await delivery.ack()


STEPS = ["open https://example.test", "log in", "search", "open first result"]
LIFE_CONFIG = WorkflowConfig(link_timeout_ms=20_000, cleanup_timeout_ms=20_000)


async def _session_life(h: Harness, observer: Observer) -> float:
    """create → every module links → ACTIVE → COMPLETED → destroy → every module
    unlinks → destroyed; seconds."""
    sid = new_id()
    w = observer.watch(sid)
    started = time.perf_counter()
    await h.client.call(CreateWorkflowSession(session_id=sid, steps=STEPS, config=LIFE_CONFIG))
    await asyncio.wait_for(w.active.wait(), 30)
    if w.failure is not None:
        raise RuntimeError(f"session {sid} failed instead of becoming ACTIVE: {w.failure}")
    await h.client.update_session_status(sid, _S.COMPLETED, reason="bench: steps done")
    await h.client.destroy_workflow_session(sid, "bench finished")
    await asyncio.wait_for(w.destroyed.wait(), 30)
    if w.orphaned:
        raise RuntimeError(f"session {sid} destroyed with orphans {w.orphaned}")
    return time.perf_counter() - started


async def _verify_destroyed(h: Harness, ids: list[uuid.UUID]) -> list[str]:
    """What the coordinator says of each session: destroyed, nothing linked."""
    gate = asyncio.Semaphore(32)

    async def one(sid: uuid.UUID) -> str | None:
        async with gate:
            s: WorkflowSession | None = await h.client.get_workflow_session(sid)
        if s is None:
            return f"{sid}: unknown to the coordinator"
        if not s.destroyed or s.modules:
            return f"{sid}: {s.status}, destroyed={s.destroyed}, linked {sorted(s.modules)}"
        return None

    return [p for p in await asyncio.gather(*(one(s) for s in ids)) if p is not None]


@measurement(
    "bus.sessions",
    "whole workflow sessions/s with the 7 reference modules and a coordinator, as processes",
    repeats=(1, 2),
    budget_s=(20.0, 150.0),
)
@contextlib.contextmanager
def bus_sessions(ctx: Context) -> Iterator[Trial]:
    count = ctx.size(40, 200)
    concurrency = ctx.size(16, 32)
    solo = ctx.size(5, 20)
    ctx.params.update(
        sessions=count,
        concurrency=concurrency,
        sessions_alone=solo,
        alone="before the concurrent batch, sessions one at a time: a life without queueing",
        modules=sorted(REFERENCE_MODULES),
        life="create (6 required + 1 optional module link) → ACTIVE → COMPLETED → destroy → "
        "7 unlinks → destroyed; ACTIVE and destroyed seen on an observer queue, then every "
        "session read back from the coordinator",
    )
    with _harness(ctx, "sessions") as (loop, h):
        observer = Observer(h)
        driven = 0

        async def setup() -> tuple[Child, list[Child]]:
            coordinator = await h.coordinator(h.dir / "sessions.sqlite")
            modules = [await h.reference_module(name) for name in REFERENCE_MODULES]
            await asyncio.gather(*(c.wait_ready() for c in (coordinator, *modules)))
            await observer.start()
            return coordinator, modules

        coordinator, modules = loop.run_until_complete(setup())

        async def batch(n: int, at_once: int) -> tuple[list[float], list[str], float]:
            """``n`` sessions, ``at_once`` at a time: their lives (s), errors, seconds."""
            gate = asyncio.Semaphore(at_once)
            lives: list[float] = []
            errors: list[str] = []

            async def one() -> None:
                async with gate:
                    try:
                        lives.append(await _session_life(h, observer))
                    except (Exception, TimeoutError) as exc:  # noqa: BLE001 - reported
                        errors.append(f"{type(exc).__name__}: {exc}")

            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return sorted(lives), errors, time.perf_counter() - began

        async def trial() -> dict[str, Figure]:
            nonlocal driven
            alone, errors, _ = await batch(solo, 1)
            meter = CpuMeter(
                {"coordinator": [coordinator.pid], "modules": [m.pid for m in modules]}
            )
            lives, more_errors, elapsed = await batch(count, concurrency)
            cpu = meter.stop()
            errors += more_errors
            ids = list(observer.watches)
            observer.watches.clear()
            driven += len(ids)
            problems = await _verify_destroyed(h, ids)
            for text in [*errors[:5], *problems[:5]]:
                ctx.note(f"bus.sessions: {text}")
            return {
                "sessions_per_s": Figure(len(lives) / elapsed, "sessions/s"),
                "life_p50_ms": Figure(percentile(lives, 0.5) * 1000, "ms", "lower"),
                "life_p99_ms": Figure(percentile(lives, 0.99) * 1000, "ms", "lower"),
                "alone.life_p50_ms": Figure(percentile(alone, 0.5) * 1000, "ms", "lower"),
                "alone.life_max_ms": Figure(alone[-1] * 1000 if alone else 0.0, "ms", "lower"),
                "failed_sessions": Figure(len(errors), "sessions", "lower"),
                "not_destroyed": Figure(len(problems), "sessions", "lower"),
                **cpu_figures("", cpu, len(lives), "session"),
            }

        try:
            yield lambda: loop.run_until_complete(trial())
        finally:
            # What each module says it did, against the sessions driven.
            loop.run_until_complete(h.stop(*modules))
            for m in modules:
                line = m.stopped_line or f"{m.name}: no summary line"
                if f"created {driven} sessions, cleaned up {driven}" not in line:
                    ctx.note(f"bus.sessions ({driven} sessions driven): {line}")


# --- the bench module process ---------------------------------------------------------


class BenchModule(SessionManager):
    """Consumes its queue through the SDK and records, per session, the versions it
    applied and when (``time.time()``), and per event (committed at, applied at)."""

    required = False

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.consumer.stats.record_versions = True
        self.spans: dict[uuid.UUID, list[float]] = {}
        self.pairs: list[tuple[float, float]] = []

    def should_join(self, session: WorkflowSession) -> bool:
        return False  # consume only: no links, so nothing is sent back to the coordinator

    async def _catch_up(self) -> None:
        """Nothing to load: the prefix is fresh, every session's events arrive from
        version 1, and the coordinator may not be running yet."""

    async def _apply(self, env: EventEnvelope) -> None:
        await super()._apply(env)
        if env.session_id == REGISTRY_ID:
            return
        now = time.time()
        span = self.spans.get(env.session_id)
        if span is None:
            self.spans[env.session_id] = [now, now]
        else:
            span[1] = now
        self.pairs.append((env.occurred_at.timestamp(), now))

    def report(self) -> dict[str, Any]:
        stats = self.consumer.stats
        return {
            "module_id": self.module_id,
            "stats": {
                k: getattr(stats, k)
                for k in (
                    "received",
                    "applied",
                    "duplicates",
                    "gaps_filled",
                    "dead_lettered",
                    "requeued",
                )
            },
            "versions": {str(k): v for k, v in stats.versions.items()},
            "spans": {str(k): v for k, v in self.spans.items()},
            "pairs": self.pairs,
        }


async def _progress(module: BenchModule) -> None:
    """``applied N`` on stdout when it changed, for the parent to wait on."""
    last = -1
    while True:
        applied = module.consumer.stats.applied
        if applied != last:
            sys.stdout.write(f"applied {applied}\n")
            sys.stdout.flush()
            last = applied
        await asyncio.sleep(0.025)


async def _module_main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    module = BenchModule(
        AmqpTransport(args.amqp_url, connection_name=f"{args.prefix} {args.module}"),
        module_id=args.module,
        topology=Topology(args.prefix),
        own_transport=True,
        register=False,  # not required: sessions go ACTIVE without it
        heartbeat_interval=0,
    )
    async with module:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        progress = asyncio.create_task(_progress(module))
        await module.run_until(stop)
        progress.cancel()
    out = Path(args.out)
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(module.report()))
    partial.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a bench module process")
    parser.add_argument("--module", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_module_main(args))


if __name__ == "__main__":
    main()
