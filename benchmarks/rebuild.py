"""Projection rebuild from scratch: ``SessionCoordinator._rebuild()`` with no checkpoint.

The data set is the shared realistic one (``raw.dataset``). For PostgreSQL the same
stored events (bytes, ids, versions, order) are copied from the SQLite file through
eventsourcing's PostgreSQL recorder in large transactions. Each trial also decodes the
same events without sessionbus code (select the state column, msgspec-decode each) so
the ratio rebuild / raw decode compares like with like.

The coordinator folds a long history in several processes (``coordinator.read.rebuild``:
one per core, at most four), as it does on start; ``rebuild_processes`` records how
many, and ``rebuild_cpu_us_per_event`` counts the CPU of all of them. The raw decode
is one process.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg.sql import SQL, Identifier

from benchmarks.environment import postgres_schema
from benchmarks.raw import PAGE, dataset, dataset_params, decode_sqlite
from benchmarks.registry import Context, Deadline, Figure, Trial, measurement, ratio, target
from contracts import EventEnvelope
from coordinator.read.projections import Projections
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore


def _rebuild(url: str) -> tuple[Projections, float, float, int]:
    """A fresh coordinator's rebuild from the store; returns (projections, seconds, CPU
    seconds of this process and its rebuild workers, processes that folded)."""
    with EventStore(url) as store:
        assert store.checkpoints.get("projections") is None, "the data set has a checkpoint"
        coordinator = SessionCoordinator(store)
        cpu_started = _cpu()
        started = time.perf_counter()
        projections = coordinator._rebuild()
        seconds = time.perf_counter() - started
        cpu = _cpu() - cpu_started
    # _rebuild freezes what it built (the coordinator keeps it for its lifetime); a
    # benchmark drops it, so let the collector see it again.
    gc.unfreeze()
    return projections, seconds, cpu, coordinator.rebuild_processes


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (the rebuild's
    workers are waited for before it returns)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _figures(
    projections: Projections, seconds: float, cpu: float, processes: int, raw: tuple[int, float]
) -> dict[str, Figure]:
    raw_count, raw_seconds = raw
    rebuild_rate = projections.events_applied / seconds
    raw_rate = raw_count / raw_seconds
    return {
        "rebuild_events_per_s": Figure(rebuild_rate, "events/s"),
        "rebuild_seconds": Figure(seconds, "s", "lower"),
        "rebuild_cpu_us_per_event": Figure(cpu / projections.events_applied * 1e6, "µs", "lower"),
        "raw_decode_events_per_s": Figure(raw_rate, "events/s"),
        "rebuild_vs_raw_decode": Figure(rebuild_rate / raw_rate, "ratio"),
        "live_sessions": Figure(len(projections.sessions), "sessions", None),
        "rebuild_processes": Figure(processes, "processes", None),
    }


@measurement(
    "rebuild.sqlite",
    "SessionCoordinator._rebuild() from scratch over the realistic data set, SQLite",
    repeats=(3, 3),
    budget_s=(40.0, 240.0),
)
@contextlib.contextmanager
def rebuild_sqlite(ctx: Context) -> Iterator[Trial]:
    path, made = dataset(ctx)
    ctx.params.update(dataset_params(made), page=SessionCoordinator(None).rebuild_page)

    def trial() -> dict[str, Figure]:
        gc.collect()
        raw = decode_sqlite(path)
        projections, seconds, cpu, processes = _rebuild(f"sqlite:///{path}")
        figures = _figures(projections, seconds, cpu, processes, raw)
        del projections
        return figures

    yield trial


# --- PostgreSQL --------------------------------------------------------------------


def copy_to_postgres(path: Path, url: str, deadline: Deadline, batch: int = 5_000) -> int:
    """Insert the SQLite store's events, in order, through the PostgreSQL recorder.

    Batches stay at a few thousand: eventsourcing 9.5.6's pipelined insert of 10,000
    events in one call never returns here (client and server both wait to read)."""
    copied = 0
    with EventStore(url) as store, contextlib.closing(sqlite3.connect(path)) as src:
        after = 0
        for _ in range(100_000_000 // batch):  # bounded by count and by time
            rows = src.execute(
                "SELECT rowid, originator_id, originator_version, topic, state "
                "FROM stored_events WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, batch),
            ).fetchall()
            if not rows:
                break
            store.recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=uuid.UUID(originator_id),
                        originator_version=version,
                        topic=topic,
                        state=state,
                    )
                    for _rowid, originator_id, version, topic, state in rows
                ]
            )
            copied += len(rows)
            after = rows[-1][0]
            if deadline.passed():
                break
    return copied


def decode_postgres(url: str, page: int = PAGE) -> tuple[int, float]:
    """The raw decode over PostgreSQL: select the state column in pages with psycopg
    (binary results), decode each with msgspec. Returns (events, seconds)."""
    with EventStore(url) as store:
        table: str = getattr(store.recorder, "events_table_name", "sessionbus_events")
        schema = store.settings.postgres_schema
        dsn = store.settings.postgres_dsn
    assert dsn is not None
    decode = msgspec.json.Decoder(EventEnvelope).decode
    query = SQL(
        "SELECT notification_id, state FROM {}.{} "
        "WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
    ).format(Identifier(schema or "public"), Identifier(table))
    count = after = 0
    gc_was = gc.isenabled()
    gc.disable()
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn, conn.cursor(binary=True) as cur:
            started = time.perf_counter()
            for _ in range(100_000_000 // page):  # bounded
                rows = cur.execute(query, (after, page), prepare=True).fetchall()
                if not rows:
                    break
                envelopes = [decode(state) for _id, state in rows]
                count += len(envelopes)
                after = rows[-1][0]
            seconds = time.perf_counter() - started
    finally:
        if gc_was:
            gc.enable()
    return count, seconds


@measurement(
    "rebuild.postgres",
    "SessionCoordinator._rebuild() from scratch over the realistic data set, PostgreSQL",
    repeats=(3, 3),
    budget_s=(60.0, 300.0),
    needs=("postgres",),
)
@contextlib.contextmanager
def rebuild_postgres(ctx: Context) -> Iterator[Trial]:
    path, made = dataset(ctx)
    with postgres_schema(ctx.postgres_url) as url:
        ctx.log(f"copying {made.events:,} events into PostgreSQL")
        started = time.perf_counter()
        copied = copy_to_postgres(path, url, Deadline(300.0))
        seconds = time.perf_counter() - started
        ctx.log(f"copied {copied:,} events in {seconds:.1f}s")
        ctx.params.update(dataset_params(made))
        ctx.params.update(
            events=copied,
            copy_seconds=round(seconds, 2),
            copied_all=copied == made.events,
            page=SessionCoordinator(None).rebuild_page,
        )
        if copied != made.events:
            ctx.note(f"rebuild.postgres: copy stopped by its time bound at {copied:,} events")

        def trial() -> dict[str, Figure]:
            gc.collect()
            raw = decode_postgres(url)
            projections, rebuild_seconds, cpu, processes = _rebuild(url)
            figures = _figures(projections, rebuild_seconds, cpu, processes, raw)
            del projections
            return figures

        yield trial


target(
    "rebuild of 1M events, SQLite",
    "rebuild.sqlite",
    "rebuild_events_per_s",
    ">=",
    150_000,
    "events/s",
    at_size=("events", 1_000_000),
)
target(
    "rebuild of 1M events, PostgreSQL",
    "rebuild.postgres",
    "rebuild_events_per_s",
    ">=",
    150_000,
    "events/s",
    at_size=("events", 1_000_000),
)
ratio(
    "rebuild_vs_raw_decode",
    ("rebuild.sqlite", "rebuild_events_per_s"),
    ("rebuild.sqlite", "raw_decode_events_per_s"),
    "coordinator rebuild rate over the bare select+msgspec decode of the same events, SQLite",
)
ratio(
    "rebuild_vs_raw_decode_postgres",
    ("rebuild.postgres", "rebuild_events_per_s"),
    ("rebuild.postgres", "raw_decode_events_per_s"),
    "the same over PostgreSQL",
)
ratio(
    "rebuild_postgres_vs_sqlite",
    ("rebuild.postgres", "rebuild_events_per_s"),
    ("rebuild.sqlite", "rebuild_events_per_s"),
    "PostgreSQL rebuild rate relative to SQLite",
)
