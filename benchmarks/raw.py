"""Baselines without sessionbus code: what the libraries alone do on this machine.

- ``raw.save``: the eventsourcing library by itself saving a plain ``Aggregate`` (one
  ``@event`` method, default JSON transcoder) to a SQLite file, one event per save and
  ten events per save.
- ``raw.decode``: stored ``EventEnvelope`` bytes (the rebuild data set) selected with
  ``sqlite3`` and decoded with a ``msgspec`` Decoder, in pages as a replay reads them.
"""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from benchmarks.registry import Context, Deadline, Figure, Trial, measurement
from benchmarks.workload import Generated, generate, verify_sample
from contracts import EventEnvelope
from coordinator.store.eventstore import EventStore

PAGE = 1000


class Counter(Aggregate):
    """A plain eventsourcing aggregate: one event method, default transcoder."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    @event("Incremented")
    def increment(self, by: int, note: str) -> None:
        self.count += by


class _Baseline(Application[uuid.UUID]):
    name = "baseline"


def _save_rate(app: _Baseline, per_save: int, deadline: Deadline, max_saves: int) -> float:
    counter = Counter(name="bench")
    app.save(counter)
    events = saves = 0
    started = time.perf_counter()
    while saves < max_saves and not deadline.passed():
        for _ in range(per_save):
            counter.increment(by=1, note="a short note about this increment")
        app.save(counter)
        saves += 1
        events += per_save
    return events / (time.perf_counter() - started)


@measurement(
    "raw.save",
    "eventsourcing alone: plain Aggregate saved to a SQLite file (default JSON transcoder)",
    repeats=(3, 5),
    budget_s=(20.0, 60.0),
)
@contextlib.contextmanager
def raw_save(ctx: Context) -> Iterator[Trial]:
    directory = ctx.tmpdir("raw-save-")
    seconds = 1.5 if ctx.quick else 3.0
    ctx.params.update(seconds_per_case=seconds, journal="WAL", synchronous="FULL (library)")
    runs = 0

    def trial() -> dict[str, Figure]:
        nonlocal runs
        runs += 1
        app = _Baseline(
            env={
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(directory / f"baseline-{runs}.sqlite"),
            }
        )
        try:
            one = _save_rate(app, 1, Deadline(seconds), 200_000)
            ten = _save_rate(app, 10, Deadline(seconds), 50_000)
        finally:
            app.close()
        return {
            "events_per_s_1_per_save": Figure(one, "events/s"),
            "events_per_s_10_per_save": Figure(ten, "events/s"),
        }

    yield trial


# --- the data set shared by raw.decode and the rebuild measurements -----------------


def rebuild_size(ctx: Context) -> int:
    return ctx.size(100_000, 1_000_000)


def dataset(ctx: Context) -> tuple[Path, Generated]:
    """A SQLite store of ``rebuild_size`` realistic events, generated once per run."""
    key = f"dataset-sqlite-{rebuild_size(ctx)}"
    if key not in ctx.shared:
        directory = ctx.tmpdir("dataset-")
        path = directory / "sessions.sqlite"
        ctx.log(f"generating {rebuild_size(ctx):,} events into {path}")
        with EventStore(f"sqlite:///{path}") as store:
            made = generate(store, events=rebuild_size(ctx), max_seconds=900.0)
            checked = verify_sample(store)
        ctx.log(
            f"generated {made.events:,} events, {made.sessions:,} sessions "
            f"({made.live_sessions:,} live) in {made.seconds:.1f}s "
            f"({made.events_per_s:,.0f} events/s); {checked} chains verified"
        )
        ctx.shared[key] = (path, made)
    path, made = ctx.shared[key]
    assert isinstance(path, Path)
    assert isinstance(made, Generated)
    return path, made


def dataset_params(made: Generated) -> dict[str, object]:
    return {
        "events": made.events,
        "sessions": made.sessions,
        "live_sessions_at_end": made.live_sessions,
        "generation_seconds": round(made.seconds, 2),
        "generation_events_per_s": round(made.events_per_s),
        "generation_complete": made.complete,
    }


def decode_sqlite(path: Path, page: int = PAGE) -> tuple[int, float]:
    """Select every stored state in rowid pages and decode it into ``EventEnvelope``
    with msgspec. Returns (events, seconds). GC is paused as a replay pauses it."""
    decoder = msgspec.json.Decoder(EventEnvelope)
    decode = decoder.decode
    conn = sqlite3.connect(path)
    count = 0
    after = 0
    gc_was = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        for _ in range(100_000_000 // page):  # bounded: far past any data set here
            rows = conn.execute(
                "SELECT rowid, state FROM stored_events WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, page),
            ).fetchall()
            if not rows:
                break
            envelopes = [decode(state) for _rowid, state in rows]
            count += len(envelopes)
            after = rows[-1][0]
        seconds = time.perf_counter() - started
    finally:
        if gc_was:
            gc.enable()
        conn.close()
    return count, seconds


@measurement(
    "raw.decode",
    "stored EventEnvelope bytes selected with sqlite3, decoded with msgspec (no sessionbus)",
    repeats=(3, 5),
    budget_s=(30.0, 120.0),
)
@contextlib.contextmanager
def raw_decode(ctx: Context) -> Iterator[Trial]:
    path, made = dataset(ctx)
    ctx.params.update(dataset_params(made), page=PAGE)

    def trial() -> dict[str, Figure]:
        count, seconds = decode_sqlite(path)
        return {
            "events_per_s": Figure(count / seconds, "events/s"),
            "us_per_event": Figure(seconds / count * 1e6, "µs", "lower"),
        }

    yield trial
