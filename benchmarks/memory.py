"""Coordinator RSS with many active sessions in its read models.

The parent writes a SQLite store of N live sessions (created, required and optional
modules linked, ACTIVE, a little activity; none ended). A fresh child process then
imports sessionbus, reads its RSS, starts ``SessionCoordinator`` on the store (rebuild
from scratch: every session lands in the projections), reads RSS again, then records
activity on every one of those sessions, as a coordinator that has been serving them
has (its writer's aggregate cache full, every session's state folded and stored again
since the start, the command memory refilled), and reads RSS a third time. RSS is
/proc/self/status VmRSS; peak is VmHWM.

Child: ``python -m benchmarks.memory STORE_URL EXPECTED_SESSIONS`` prints one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import coordinator
from benchmarks.environment import rss_bytes
from benchmarks.registry import Context, Figure, Trial, measurement, target
from benchmarks.workload import as_running, generate
from coordinator.read.loader import CHECKPOINT_NAME
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore

MB = 1024 * 1024


def _child_environment() -> tuple[Path, dict[str, str]]:
    """Where the child runs, and its environment: it imports the same sessionbus and
    benchmarks code as this process."""
    code_root = Path(coordinator.__file__).parent.parent
    bench_root = Path(__file__).absolute().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(code_root), str(bench_root), env.get("PYTHONPATH", "")) if p
    )
    return code_root, env


def _sessions(ctx: Context) -> int:
    return ctx.size(20_000, 100_000)


@measurement(
    "memory.sessions",
    "coordinator RSS after start with N active sessions in the read models (child process)",
    repeats=(1, 1),
    budget_s=(120.0, 600.0),
)
@contextlib.contextmanager
def memory_sessions(ctx: Context) -> Iterator[Trial]:
    count = _sessions(ctx)
    path = ctx.tmpdir("memory-") / "active.sqlite"
    url = f"sqlite:///{path}"
    ctx.log(f"writing {count:,} active sessions into {path}")
    with EventStore(url) as store:
        made = generate(store, sessions=count, may_end=False, activity=(1, 3), max_seconds=600.0)
        as_running(store)
    ctx.log(f"wrote {made.events:,} events in {made.seconds:.1f}s")
    ctx.params.update(
        sessions=made.sessions,
        live_sessions=made.live_sessions,
        events=made.events,
        generation_seconds=round(made.seconds, 2),
    )

    cwd, env = _child_environment()

    def child(touch: bool) -> dict[str, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.memory",
                url,
                str(made.live_sessions),
                "touch" if touch else "start",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=cwd,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory child failed ({done.returncode}): {done.stderr[-2000:]}")
        got: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return got

    def trial() -> dict[str, Figure]:
        # From scratch: no projection checkpoint (a previous trial's close wrote one).
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("DELETE FROM sessionbus_checkpoints WHERE name = ?", (CHECKPOINT_NAME,))
        got = child(touch=True)
        # Restart: the first child's close checkpointed the projections; this one
        # restores them from that snapshot instead of replaying.
        restored = child(touch=False)
        sessions = got["active_sessions"]
        grown = got["rss_after_start"] - got["rss_before"]
        return {
            "rss_before_mb": Figure(got["rss_before"] / MB, "MB", "lower"),
            "rss_after_start_mb": Figure(got["rss_after_start"] / MB, "MB", "lower"),
            "rss_after_commands_mb": Figure(got["rss_after_commands"] / MB, "MB", "lower"),
            "rss_peak_mb": Figure(got["rss_peak"] / MB, "MB", "lower"),
            "bytes_per_session": Figure(grown / sessions, "B", "lower"),
            "rss_after_checkpoint_start_mb": Figure(
                restored["rss_after_start"] / MB, "MB", "lower"
            ),
            "checkpoint_bytes_per_session": Figure(
                (restored["rss_after_start"] - restored["rss_before"]) / sessions, "B", "lower"
            ),
            "active_sessions": Figure(sessions, "sessions", None),
            "cached_aggregates": Figure(got["cached_aggregates"], "aggregates", None),
            "start_seconds": Figure(got["start_seconds"], "s", "lower"),
            "checkpoint_start_seconds": Figure(restored["start_seconds"], "s", "lower"),
            "gc_tracked_objects": Figure(got["gc_tracked_objects"], "objects", None),
            "full_gc_pause_ms": Figure(got["full_gc_seconds"] * 1000, "ms", "lower"),
        }

    yield trial


target(
    "RSS with 100k active sessions (after commands)",
    "memory.sessions",
    "rss_after_commands_mb",
    "<=",
    300,
    "MB",
    at_size=("live_sessions", 100_000),
)


async def _child(url: str, expected: int, touch: bool) -> dict[str, Any]:
    before, _ = rss_bytes()
    coordinator = SessionCoordinator(url)
    started = time.perf_counter()
    await coordinator.start()
    start_seconds = time.perf_counter() - started
    try:
        after_start, _ = rss_bytes()
        active = coordinator.list_active_workflow_sessions()
        if len(active) != expected:
            raise RuntimeError(f"expected {expected} active sessions, found {len(active)}")
        writer = coordinator._writer
        assert writer is not None
        touched = active if touch else []
        for offset in range(0, len(touched), 256):
            wave = touched[offset : offset + 256]
            await asyncio.gather(*(coordinator.record_activity(sid) for sid in wave))
        after_commands, peak = rss_bytes()
        cached = len(writer._cache)
        # What one full collection costs once the long-lived read models are no longer
        # in the frozen generation (start-up freezes them; every later change replaces
        # frozen objects with tracked ones, so a long-running coordinator gets here).
        gc.unfreeze()
        tracked = len(gc.get_objects())
        collect_started = time.perf_counter()
        gc.collect()
        full_gc_seconds = time.perf_counter() - collect_started
    finally:
        await coordinator.close()
    return {
        "rss_before": before,
        "rss_after_start": after_start,
        "rss_after_commands": after_commands,
        "rss_peak": peak,
        "active_sessions": len(active),
        "cached_aggregates": cached,
        "start_seconds": start_seconds,
        "gc_tracked_objects": tracked,
        "full_gc_seconds": full_gc_seconds,
    }


if __name__ == "__main__":
    # Everything a coordinator imports is imported above, before the first reading:
    # "before" is the interpreter plus code, and the difference is data.
    report = asyncio.run(_child(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "touch"))
    print(json.dumps(report))
