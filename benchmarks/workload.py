"""Realistic session histories, written fast but for real.

Every event is made by ``coordinator.domain.aggregates``'s aggregates (rules checked, envelopes
sealed, hashes chained, state folded) and appended by ``EventStore.save``, exactly as
the coordinator's writer does; only the asyncio front end and the one-commit-per-pass
pacing are skipped, so thousands of events go into each transaction.

A session's life: created (INITIALIZING), the three required modules and up to four
optional ones link (ACTIVE after the last required link), activity from the modules and
the session, sometimes a pause and resume or a module status change; then most sessions
end (completed, cancelled, or failed by a module's fatal error), go through CLEANUP,
their modules unlink and they are destroyed, while about a quarter stay live.
"""

from __future__ import annotations

import random
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts import (
    ErrorCode,
    ModuleSessionConfig,
    SessionStatus,
    StandardError,
    Topology,
    WorkflowConfig,
    verify_chain_raw,
)
from coordinator.domain.aggregates import (
    OPERATOR,
    CommandContext,
    ModuleRegistry,
    Principal,
    WorkflowSessionAggregate,
)
from coordinator.service.relay import relay_checkpoint
from coordinator.store.eventstore import EventStore

MODULES = (
    "ai-context-manager",
    "ai-integration",
    "executor",
    "task-loop",
    "step-processor",
    "executor-streamer",
    "frontend-api",
)
REQUIRED = ("executor", "ai-integration", "executor-streamer")
OPTIONAL = tuple(m for m in MODULES if m not in REQUIRED)
_S = SessionStatus
_PRINCIPALS = {m: Principal(m, frozenset({m})) for m in MODULES}
# Timeouts long enough that none falls due while a benchmark runs on the data: the
# synthetic history ends within the last hour and a coordinator started on it must not
# spend its first minutes failing sessions.
_HOURS = 3_600_000


class _Clock:
    """Synthetic time, starting an hour ago: each command a fraction of a millisecond
    after the previous one (a million events span under four minutes)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = datetime.now(UTC) - timedelta(hours=1)

    def tick(self) -> datetime:
        self.now += timedelta(microseconds=self.rng.randint(20, 400))
        return self.now


def register_modules(store: EventStore) -> tuple[ModuleRegistry, int]:
    """The seed's seven modules, three of them required; returns the registry and how
    many events registering them appended."""
    registry = store.load_registry()
    ctx = CommandContext(OPERATOR, datetime.now(UTC) - timedelta(hours=2), uuid.uuid4())
    for module_id in MODULES:
        registry.register(ctx, module_id, module_id in REQUIRED, ["sessions"])
    saved = store.save([registry]) if registry.unsaved else []
    return registry, len(saved)


def _session(
    rng: random.Random,
    clock: _Clock,
    registry: ModuleRegistry,
    *,
    may_end: bool,
    activity: tuple[int, int],
) -> Iterator[WorkflowSessionAggregate]:
    """One session's commands, one per ``next()``; yields the aggregate after each."""
    correlation = uuid.uuid4()

    def ctx(module_id: str | None = None) -> CommandContext:
        principal = _PRINCIPALS[module_id] if module_id else OPERATOR
        return CommandContext(principal, clock.tick(), uuid.uuid4(), correlation)

    config = WorkflowConfig(
        timeout_ms=rng.choice((None, 4 * _HOURS, 24 * _HOURS)),
        metadata={"tenant": f"t{rng.randint(1, 40)}", "user": f"u{rng.randint(1, 5000)}"},
    )
    steps = [f"step-{i}" for i in range(rng.randint(1, 6))]
    session = WorkflowSessionAggregate.create(ctx(), uuid.uuid4(), steps, config, registry)
    yield session
    modules = list(REQUIRED) + rng.sample(OPTIONAL, rng.randint(0, len(OPTIONAL)))
    rng.shuffle(modules)
    for module_id in modules:
        session.link(
            ctx(module_id),
            module_id,
            uuid.uuid4(),
            ModuleSessionConfig(timeout_ms=4 * _HOURS, retry_attempts=3),
            {"worker": f"{module_id}-{rng.randint(1, 8)}"},
            registry,
        )
        yield session
    for _ in range(rng.randint(*activity)):
        active: str | None = rng.choice((*modules, None))
        session.record_activity(ctx(active), active)
        yield session
    if rng.random() < 0.25:
        session.set_status(ctx(), _S.PAUSED, "operator paused")
        yield session
        session.set_status(ctx(), _S.ACTIVE, "operator resumed")
        yield session
    if rng.random() < 0.15:
        module_id = rng.choice([m for m in modules if m not in REQUIRED] or modules)
        session.set_module_status(ctx(module_id), module_id, _S.PAUSED, "backpressure")
        yield session
        session.set_module_status(ctx(module_id), module_id, _S.ACTIVE, None)
        yield session
    if not may_end or rng.random() < 0.25:
        return  # stays live
    ending = rng.random()
    if ending < 0.75:
        session.set_status(ctx(), _S.COMPLETED, "all steps done")
        yield session
        session.destroy(ctx(), "finished")
    elif ending < 0.85:
        session.set_status(ctx(), _S.CANCELLED, "user cancelled")
        yield session
        session.destroy(ctx(), "cancelled")
    else:
        module_id = rng.choice(REQUIRED)
        error = StandardError(code=ErrorCode.MODULE_ERROR, message="browser crashed")
        session.report_error(ctx(module_id), module_id, error, True)
    yield session
    for module_id in list(session.state.modules):
        session.unlink(ctx(module_id), module_id, "session ended")
        yield session


@dataclass
class Generated:
    events: int
    sessions: int
    live_sessions: int
    seconds: float
    complete: bool  # False when the time bound stopped it early

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def generate(
    store: EventStore,
    *,
    events: int | None = None,
    sessions: int | None = None,
    may_end: bool = True,
    activity: tuple[int, int] = (3, 14),
    in_flight: int = 1000,
    batch_events: int = 20_000,
    seed: int = 7,
    max_seconds: float = 900.0,
) -> Generated:
    """Append realistic sessions until ``events`` events (stopping mid-lifecycle, as a
    live log does) or ``sessions`` sessions have been written to their end."""
    assert (events is None) != (sessions is None), "give events or sessions"
    rng = random.Random(seed)
    clock = _Clock(rng)
    registry, written = register_modules(store)
    started = 0
    scripts: list[Iterator[WorkflowSessionAggregate]] = []
    touched: dict[uuid.UUID, WorkflowSessionAggregate] = {}
    pending = 0
    live: set[uuid.UUID] = set()
    began = time.perf_counter()
    complete = True

    def more_sessions() -> bool:
        if sessions is not None:
            return started < sessions
        assert events is not None
        return written + pending < events

    def flush() -> None:
        nonlocal written, pending
        if touched:
            written += len(store.save(list(touched.values())))
            for sid, aggregate in touched.items():
                if aggregate.state.destroyed:
                    live.discard(sid)
                else:
                    live.add(sid)
            touched.clear()
            pending = 0

    for _round in range(100_000_000):  # bounded by count (the sizes) and by time below
        while len(scripts) < in_flight and more_sessions():
            scripts.append(_session(rng, clock, registry, may_end=may_end, activity=activity))
            started += 1
        if not scripts or (events is not None and written + pending >= events):
            break
        alive = []
        for script in scripts:
            aggregate = next(script, None)
            if aggregate is None:
                continue
            alive.append(script)
            if aggregate.id not in touched:
                touched[aggregate.id] = aggregate
            pending += 1  # at least one event per command; exact count comes from save
        scripts = alive
        if pending >= batch_events:
            flush()
        if time.perf_counter() - began > max_seconds:
            complete = False
            break
    flush()
    return Generated(
        events=written,
        sessions=started,
        live_sessions=len(live),
        seconds=time.perf_counter() - began,
        complete=complete,
    )


def verify_sample(store: EventStore, count: int = 25, seed: int = 3) -> int:
    """Check the hash chains of ``count`` sessions picked at random; returns how many
    were checked. Raises when one is broken: the data must be what the coordinator
    would have written."""
    rng = random.Random(seed)
    top = store.max_position()
    checked = 0
    seen: set[uuid.UUID] = set()
    for _ in range(count * 4):
        if checked >= count or top < 2:
            break
        page = store.read(rng.randint(1, top - 1), 1)
        if not page or page[0].session_id in seen:
            continue
        sid = page[0].session_id
        seen.add(sid)
        verdict = verify_chain_raw(store.raw_history(sid))
        if not verdict.ok:
            raise AssertionError(f"generated chain of {sid} is broken: {verdict.reason}")
        checked += 1
    return checked


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def count_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM stored_events").fetchone()[0])


def as_running(store: EventStore, topology: Topology | None = None) -> None:
    """Bring a generated store to where a running coordinator would have kept it: its
    module-session lookup complete, and (with ``topology``) every event published, the
    relay's position at the end of the log. Otherwise the coordinator measured on it
    would spend its first minutes publishing the generated history and reading it for
    the lookup, beside what is measured."""
    end = store.max_position()
    for last, pairs in store.module_links(store.module_links_position(), end, 5000):
        store.add_module_links(pairs, last)
    if topology is not None:
        store.checkpoints.put(relay_checkpoint(topology), end)
