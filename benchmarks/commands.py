"""Command application through ``SessionCoordinator`` with group commit.

Each wave sends one command to each of ``in_flight`` sessions at once
(``asyncio.gather``) and waits for all of them; a cycle of fifteen waves takes every
session through its life: create, three required links (ACTIVE), four activity
records, pause, resume, destroy (CLEANUP), three unlinks (destroyed) — 15 commands and
16 events per session. Events are counted from the store (``max_position`` before and
after); latency is each awaited call, in process (no broker). CPU time (all threads of the
process, per event) is reported beside wall-clock rates: it is far less disturbed by
other work on a shared machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.environment import postgres_schema
from benchmarks.registry import Context, Figure, Trial, measurement, percentile, ratio, target
from benchmarks.workload import REQUIRED
from contracts import SessionStatus
from coordinator.service.coordinator import SessionCoordinator

_S = SessionStatus
Step = Callable[[uuid.UUID], Awaitable[Any]]


def _levels(ctx: Context) -> tuple[int, ...]:
    return (1, 64, 256) if ctx.quick else (1, 64, 256, 512)


def _run_seconds(ctx: Context, in_flight: int) -> float:
    if in_flight == 1:
        return 1.5 if ctx.quick else 3.0
    return 2.0 if ctx.quick else 5.0


def _life(c: SessionCoordinator) -> list[Step]:
    """The commands after create, in order: one wave each."""

    def link(module_id: str) -> Step:
        return lambda sid: c.link_module_session(sid, module_id, uuid.uuid4())

    def activity(module_id: str) -> Step:
        return lambda sid: c.record_activity(sid, module_id)

    def status(new: SessionStatus) -> Step:
        return lambda sid: c.update_session_status(sid, new)

    def unlink(module_id: str) -> Step:
        return lambda sid: c.unlink_module_session(sid, module_id, "session ended")

    def destroy(sid: uuid.UUID) -> Awaitable[Any]:
        return c.destroy_workflow_session(sid, "done")

    return [
        *map(link, REQUIRED),
        *(activity(REQUIRED[k % len(REQUIRED)]) for k in range(4)),
        status(_S.PAUSED),
        status(_S.ACTIVE),
        destroy,
        *map(unlink, REQUIRED),
    ]


async def _cycle(coordinator: SessionCoordinator, in_flight: int, latencies: list[float]) -> int:
    """One life of ``in_flight`` sessions in waves; returns how many commands."""

    async def timed(call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        result = await call
        latencies.append(time.perf_counter() - started)
        return result

    sessions = await asyncio.gather(
        *(timed(coordinator.create_workflow_session(["plan", "act"])) for _ in range(in_flight))
    )
    ids = [s.session_id for s in sessions]
    steps = _life(coordinator)
    for step in steps:
        await asyncio.gather(*(timed(step(sid)) for sid in ids))
    return in_flight * (1 + len(steps))


async def _level(coordinator: SessionCoordinator, in_flight: int, seconds: float) -> dict[str, Any]:
    assert coordinator.store is not None
    writer = coordinator._writer
    assert writer is not None
    latencies: list[float] = []
    commands = 0
    batches_before = writer.batches
    position_before = await asyncio.to_thread(coordinator.store.max_position)
    cpu_started = time.process_time()
    started = time.perf_counter()
    for _ in range(10_000):  # bounded by count and by time
        commands += await _cycle(coordinator, in_flight, latencies)
        if time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    position_after = await asyncio.to_thread(coordinator.store.max_position)
    latencies.sort()
    events = position_after - position_before
    return {
        "events": events,
        "commands": commands,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "batches": writer.batches - batches_before,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


async def _trial(coordinator: SessionCoordinator, ctx: Context) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    peak = 0.0
    for in_flight in _levels(ctx):
        got = await _level(coordinator, in_flight, _run_seconds(ctx, in_flight))
        rate = got["events"] / got["seconds"]
        if in_flight > 1:
            peak = max(peak, rate)
        prefix = f"inflight_{in_flight}"
        figures[f"{prefix}.events_per_s"] = Figure(rate, "events/s")
        figures[f"{prefix}.commands_per_s"] = Figure(got["commands"] / got["seconds"], "cmd/s")
        figures[f"{prefix}.p50_ms"] = Figure(got["p50"] * 1000, "ms", "lower")
        figures[f"{prefix}.p99_ms"] = Figure(got["p99"] * 1000, "ms", "lower")
        figures[f"{prefix}.cpu_us_per_event"] = Figure(
            got["cpu_seconds"] / max(1, got["events"]) * 1e6, "µs", "lower"
        )
        figures[f"{prefix}.commands_per_writer_pass"] = Figure(
            got["commands"] / max(1, got["batches"]), "cmd", None
        )
    figures["peak_events_per_s"] = Figure(peak, "events/s")
    return figures


@contextlib.contextmanager
def _running(url: str, ctx: Context) -> Iterator[Trial]:
    """A started coordinator on its own event loop, reused by every trial."""
    loop = asyncio.new_event_loop()
    coordinator = SessionCoordinator(url)
    try:
        loop.run_until_complete(coordinator.start())
        for module_id in REQUIRED:
            loop.run_until_complete(coordinator.register_module(module_id, required=True))
        # Warm up: one small cycle, so first-use costs are not measured.
        loop.run_until_complete(_cycle(coordinator, 32, []))
        ctx.params.update(
            in_flight_levels=list(_levels(ctx)),
            seconds_per_level={str(n): _run_seconds(ctx, n) for n in _levels(ctx)},
            max_batch=coordinator.max_batch,
            commands_per_session=15,
            events_per_session=16,
        )
        yield lambda: loop.run_until_complete(_trial(coordinator, ctx))
    finally:
        loop.run_until_complete(coordinator.close())
        loop.close()


@measurement(
    "commands.sqlite",
    "SessionCoordinator commands, group commit, SQLite file (synchronous=FULL, WAL)",
    repeats=(2, 3),
    budget_s=(40.0, 150.0),
)
@contextlib.contextmanager
def commands_sqlite(ctx: Context) -> Iterator[Trial]:
    path: Path = ctx.tmpdir("commands-") / "store.sqlite"
    with _running(f"sqlite:///{path}", ctx) as trial:
        yield trial


@measurement(
    "commands.postgres",
    "SessionCoordinator commands, group commit, PostgreSQL (own schema)",
    repeats=(2, 3),
    budget_s=(40.0, 150.0),
    needs=("postgres",),
)
@contextlib.contextmanager
def commands_postgres(ctx: Context) -> Iterator[Trial]:
    with postgres_schema(ctx.postgres_url) as url, _running(url, ctx) as trial:
        yield trial


target(
    "group commit, SQLite",
    "commands.sqlite",
    "peak_events_per_s",
    ">=",
    10_000,
    "events/s",
)
target(
    "group commit, PostgreSQL",
    "commands.postgres",
    "peak_events_per_s",
    ">=",
    5_000,
    "events/s",
)
ratio(
    "group_commit_vs_raw_single_save_sqlite",
    ("commands.sqlite", "peak_events_per_s"),
    ("raw.save", "events_per_s_1_per_save"),
    "sessionbus group commit (full command path) vs eventsourcing alone, 1 event per save",
)
ratio(
    "group_commit_vs_raw_ten_per_save_sqlite",
    ("commands.sqlite", "peak_events_per_s"),
    ("raw.save", "events_per_s_10_per_save"),
    "sessionbus group commit vs eventsourcing alone, 10 events per save",
)
ratio(
    "group_commit_vs_one_in_flight_sqlite",
    ("commands.sqlite", "peak_events_per_s"),
    ("commands.sqlite", "inflight_1.events_per_s"),
    "what group commit gains over one command at a time, SQLite",
)
ratio(
    "group_commit_vs_one_in_flight_postgres",
    ("commands.postgres", "peak_events_per_s"),
    ("commands.postgres", "inflight_1.events_per_s"),
    "what group commit gains over one command at a time, PostgreSQL",
)
ratio(
    "group_commit_postgres_vs_sqlite",
    ("commands.postgres", "peak_events_per_s"),
    ("commands.sqlite", "peak_events_per_s"),
    "PostgreSQL group commit rate relative to SQLite",
)
