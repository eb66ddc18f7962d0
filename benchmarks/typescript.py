"""The TypeScript module SDK over the real broker: events delivered to one module per
second, beside the Python module and a bare Node consumer, in the same run.

``ts.delivered``: per trial, three phases, each a backlog committed straight into a
fresh store (``bus._write_backlog``: whole session lives, eleven events each) and
published by a ``sessionctl coordinator`` process's outbox relay into one module queue
(declared beforehand with the module queue's arguments); once the queue holds all of
it the coordinator stops and one consumer process drains it — so the figure is what
the consumer can take, not how fast the relay publishes:

- ``ts_module``: ``typescript/dist/bench/bench-module.js``, a ``SessionManager`` of
  ``@sessionbus/module-sdk`` joining no session (runtime validation, per-session order,
  dedupe by version, acks — what a TypeScript module pays);
- ``py_module``: ``python -m benchmarks.bus --module``, the same for the Python SDK;
- ``bare_node``: ``typescript/dist/bench/bare-consumer.js``, amqplib alone on a queue
  declared as a module queue, acking each delivery without decoding it (the floor).

The rate is first applied → last applied (``time.time()`` in each process), from a full
queue. The phase
order rotates between trials, so no consumer always runs first on a warm broker. Each
consumer's report is checked: every committed event once, each session in order.

The TypeScript package is built (``npm ci`` if it has no ``node_modules``, then
``npm run build``) before the first trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bus import (
    AMQP,
    ROOT,
    Child,
    Harness,
    _applied,
    _check,
    _delete_module_queues,
    _harness,
    _read_report,
    _spawn,
    _until,
    _write_backlog,
)
from benchmarks.registry import Context, Deadline, Figure, Trial, measurement

PACKAGE = ROOT / "typescript"
TS_MODULE = "bench-ts"
PY_MODULE = "bench-py"
BARE = "bench-bare"
PHASES = ("ts_module", "py_module", "bare_node")
MODULE_OF = {"ts_module": TS_MODULE, "py_module": PY_MODULE, "bare_node": BARE}


def _build(ctx: Context) -> str:
    """Build the TypeScript package; the path of ``node``."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("ts.delivered needs node and npm on PATH")
    if not (PACKAGE / "node_modules").is_dir():
        ctx.log("npm ci in typescript/")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PACKAGE, check=True)
    subprocess.run([npm, "run", "build"], cwd=PACKAGE, check=True, capture_output=True)
    return node


async def _fill(h: Harness, store: Path, module_id: str, total: int, timeout: float) -> bool:
    """The relay publishes the store's backlog into ``module_id``'s queue (declared
    first, as the module declares it); True once the queue holds ``total``."""
    queue = h.topology.module_queue(module_id)
    await h.transport.declare_queue(h.topology.module_queue_spec(module_id))
    coordinator = await h.coordinator(store)
    try:
        await coordinator.wait_ready()
        deadline = Deadline(timeout)
        while not deadline.passed():
            stats = await h.transport.queue_stats(queue)
            if stats is not None and stats.messages >= total:
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        await h.stop(coordinator)


async def _consumer(h: Harness, node: str, phase: str, out: Path) -> Child:
    if phase == "ts_module":
        argv = [node, str(PACKAGE / "dist/bench/bench-module.js"), TS_MODULE, h.prefix, AMQP]
        name = TS_MODULE
    elif phase == "bare_node":
        argv = [node, str(PACKAGE / "dist/bench/bare-consumer.js"), BARE, h.prefix, AMQP]
        name = BARE
    else:
        return await h.bench_module(PY_MODULE, out)
    child = await _spawn(name, [*argv, str(out)], "ready")
    h.children.append(child)
    h.started.append(child)
    return child


@measurement(
    "ts.delivered",
    "committed backlog → applied in one TypeScript module, one Python module and a bare "
    "amqplib consumer (outbox relay)",
    repeats=(1, 3),
    budget_s=(90.0, 400.0),
)
@contextlib.contextmanager
def ts_delivered(ctx: Context) -> Iterator[Trial]:
    sessions = ctx.size(200, 600)
    timeout = 30.0 + sessions * 11 / 100
    ctx.params.update(
        sessions_per_phase=sessions,
        events_per_session=11,
        consumers="ts_module: @sessionbus/module-sdk SessionManager; py_module: module_sdk "
        "SessionManager; bare_node: amqplib alone, ack only; one process each, prefetch 128",
        timing="first event applied to last applied, time.time()",
        order="phases rotate between trials",
    )
    node = _build(ctx)
    with _harness(ctx, "typescript") as (loop, h):
        trials = 0

        async def phase(name: str) -> tuple[float, int, int]:
            store = h.dir / f"store-{name}-{trials}.sqlite"
            out = h.dir / f"{name}-{trials}.json"
            try:
                backlog = await _write_backlog(store, sessions)
                total = sum(backlog.values())
                filled = await _fill(h, store, MODULE_OF[name], total, timeout)
                if not filled:
                    ctx.note(f"trial {trials}, {name}: the queue never held {total} events")
                consumer = await _consumer(h, node, name, out)
                try:
                    await consumer.wait_ready()
                    done = await _until(lambda: consumer.applied >= total, timeout, [consumer])
                finally:
                    await h.stop(consumer)
            finally:
                await _delete_module_queues(h, (TS_MODULE, PY_MODULE, BARE))
            report = _read_report(consumer, out)
            applied = _applied(report, backlog)
            if not done:
                ctx.note(f"trial {trials}, {name}: not every event within {timeout:.0f} s")
            wrong = _check(ctx, f"trial {trials}, {name}", {name: applied}, [report])
            return applied.events / (applied.last - applied.first), wrong, total

        async def trial() -> dict[str, Figure]:
            nonlocal trials
            trials += 1
            shift = (trials - 1) % len(PHASES)
            rates: dict[str, float] = {}
            figures: dict[str, Figure] = {}
            for name in PHASES[shift:] + PHASES[:shift]:
                rate, wrong, total = await phase(name)
                ctx.log(f"{name}: {rate:,.0f} events/s")
                rates[name] = rate
                figures[f"{name}.events_per_s"] = Figure(rate, "events/s")
                figures[f"{name}.wrong_events"] = Figure(wrong, "events", "lower")
                figures["events_per_phase"] = Figure(total, "events", None)
            figures["ts_vs_py"] = Figure(rates["ts_module"] / rates["py_module"], "ratio")
            figures["ts_vs_bare_node"] = Figure(rates["ts_module"] / rates["bare_node"], "ratio")
            return figures

        yield lambda: loop.run_until_complete(trial())
