"""Projection rebuild across processes: the log partitioned by session.

Folding is CPU-bound Python, so one process replays at one core's speed whatever the
machine has. Every session's events fold independently of every other session's, so the
log splits by session id (``Partition``) into disjoint parts, each folded by its own
process reading the same store; this process folds part 0 while the others fold the
rest, then merges what they send back. What spans sessions is merged by log position:
the applied-command memory and the recently destroyed sessions keep the newest entries,
exactly as a sequential fold would have kept them.

Only a rebuild from scratch of a store other processes can open (a SQLite file,
PostgreSQL) is partitioned; anything a worker cannot do (start, open the store, read an
event) makes the caller fold sequentially instead, which reports the error itself.
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import operator
import os
import pickle
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Final

import msgspec

from contracts import Accepted, Codec, ModuleRegistered, WorkflowSession
from contracts.codec import Format
from contracts.status import SessionStatus
from coordinator.domain import compact
from coordinator.read.projections import (
    COMMAND_MEMORY,
    DESTROYED_MEMORY,
    Projections,
    shared_session_id,
)
from coordinator.store.eventstore import MAX_PARTITIONS, EventStore, Partition, Upcaster

__all__ = ["MAX_PARTITIONS", "PARALLEL_MIN_EVENTS", "default_workers", "rebuild_partitioned"]

log = logging.getLogger("sessionbus.coordinator.rebuild")

# Fewer events than this fold faster in one process than it takes to start another.
PARALLEL_MIN_EVENTS: Final = 200_000
# More processes than this contend for the store more than they gain.
MAX_WORKERS: Final = 4

RebuildProgress = Callable[[int, int], None]


def default_workers() -> int:
    """The cores this process may run on, at most ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class _Part(msgspec.Struct, array_like=True):
    """What a worker sends back: its partition's projections, with the positions a
    merge needs (``Projections.track_positions``)."""

    events_applied: int
    sessions: list[tuple[uuid.UUID, bytes | WorkflowSession]]
    by_status: dict[SessionStatus, list[uuid.UUID]]
    by_module: dict[str, list[uuid.UUID]]
    destroyed: int
    recently_destroyed: list[tuple[int, uuid.UUID, bytes | WorkflowSession]]
    modules: dict[str, ModuleRegistered]
    orphans: dict[uuid.UUID, dict[str, uuid.UUID]]
    # (first position, command id's 16 bytes, outcome)
    commands: list[tuple[int, bytes, Accepted]]
    # The worker's module-name numbers, which its packed states use (``compact``).
    names: list[str]


_SPAWN: Final = multiprocessing.get_context("spawn")
_encoder: Final = msgspec.msgpack.Encoder(uuid_format="bytes")
_decoder: Final = msgspec.msgpack.Decoder(_Part)


@dataclass(frozen=True)
class _Job:
    """One worker's part of a rebuild; pickled to a pool process."""

    url: str
    codec_format: Format
    max_body: int
    upcaster: Upcaster
    part: Partition
    until: int
    page: int
    command_memory: int
    destroyed_memory: int
    names: list[str]  # the starting process's module-name numbers, to number alike


def _fold(
    store: EventStore,
    job: _Job,
    progress: RebuildProgress | None = None,
) -> Projections:
    proj = Projections(command_memory=job.command_memory, destroyed_memory=job.destroyed_memory)
    proj.track_positions()
    proj.begin_replay()
    for page in store.replay(0, job.page, until=job.until, part=job.part):
        proj.apply_all(page)
        if progress is not None:
            progress(proj.position, job.until)
    proj.end_replay()
    return proj


def _fold_encoded(job: _Job) -> bytes:
    """A worker process's whole task: fold one partition, send it back encoded."""
    gc.disable()  # as the sequential rebuild: everything made here lives until the end
    compact.renumbering(job.names)  # number the names as the starting process does
    codec = Codec(job.codec_format, max_body=job.max_body)
    with EventStore(job.url, codec=codec, upcaster=job.upcaster, existing=True) as store:
        proj = _fold(store, job)
    return _encoder.encode(_part(proj))


def _part(proj: Projections) -> _Part:
    """A tracked partition's projections as sent back to the starting process."""
    return _Part(
        events_applied=proj.events_applied,
        sessions=list(proj.sessions.entries()),
        by_status={s: list(ids) for s, ids in proj.by_status.items() if ids},
        by_module={m: list(ids) for m, ids in proj.by_module.items()},
        destroyed=proj.destroyed,
        recently_destroyed=proj.recently_destroyed_at(),
        modules=proj.modules,
        orphans=proj.orphans,
        commands=[(at, key.to_bytes(16, "big"), a) for at, key, a in proj.commands_at()],
        names=compact.names(),
    )


def rebuild_partitioned(
    store: EventStore,
    until: int,
    *,
    workers: int,
    page: int = 1000,
    progress: RebuildProgress | None = None,
    command_memory: int = COMMAND_MEMORY,
    destroyed_memory: int = DESTROYED_MEMORY,
) -> Projections | None:
    """Fold positions ``1..until`` with ``workers`` processes (this one included) into
    projections at position ``until``; ``None`` when that cannot be done (see the
    module's docstring), having logged why."""
    if workers < 2 or not store.partitionable:
        return None
    jobs = [
        _Job(
            url=store.settings.url,
            codec_format=store.mapper.codec.format,
            max_body=store.mapper.codec.max_body,
            upcaster=store.mapper.upcaster,
            part=Partition(index, workers),
            until=until,
            page=page,
            command_memory=command_memory,
            destroyed_memory=destroyed_memory,
            names=compact.names(),
        )
        for index in range(workers)
    ]
    try:
        # All jobs carry the same settings: one that cannot be sent stops nothing started.
        pickle.dumps(jobs[1])
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        log.info("rebuild in one process: the store's settings cannot be sent (%s)", exc)
        return None
    started = time.monotonic()
    # Spawned, not forked: a forked child would inherit this process's threads (the
    # store's pool, the event loop's) in whatever state they were. A spawned worker
    # imports the embedding program's main module as ``__mp_main__``: a program that
    # starts a coordinator must keep that behind ``if __name__ == "__main__"``.
    pool = ProcessPoolExecutor(max_workers=len(jobs) - 1, mp_context=_SPAWN)
    try:
        futures = [pool.submit(_fold_encoded, job) for job in jobs[1:]]
        own = _fold(store, jobs[0], progress)
        # The others have the same amount of work: far longer means something is wrong.
        deadline = time.monotonic() + max(60.0, 3 * (time.monotonic() - started))
        encoded = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
    except Exception as exc:  # noqa: BLE001
        # Whatever went wrong (a worker that could not start, open the store or read an
        # event; one that took too long), the sequential fold runs next and meets (and
        # reports) any fault in the history itself.
        log.warning(
            "partitioned rebuild failed (%s: %s); folding in one process", type(exc).__name__, exc
        )
        pool.shutdown(wait=False, cancel_futures=True)
        return None
    pool.shutdown(wait=True)
    parts = [_decoder.decode(data) for data in encoded]
    del encoded
    merged = _merge(own, parts, until)
    if progress is not None:
        progress(until, until)
    return merged


def _merge(own: Projections, parts: list[_Part], until: int) -> Projections:
    """Fold the other partitions' projections into ``own``, as one sequential fold of
    the whole log would have left them."""
    proj = own
    ids: dict[int, uuid.UUID] = {}  # one id object per session, shared by every index
    for sid, _value in proj.sessions.entries():
        ids[sid.int] = sid
    for part in parts:
        mapping = compact.renumbering(part.names)
        proj.adopt(part.sessions, part.by_status, part.by_module, mapping, ids)
        if mapping:
            part.recently_destroyed = [
                (at, sid, compact.renumber(v, mapping) if isinstance(v, bytes) else v)
                for at, sid, v in part.recently_destroyed
            ]
        proj.destroyed += part.destroyed
        proj.modules.update(part.modules)
        for workflow_id, held in part.orphans.items():
            proj.orphans.setdefault(workflow_id, {}).update(held)
        proj.events_applied += part.events_applied

    # The newest destroyed sessions of all partitions, in the order they were destroyed.
    destroyed = sorted(
        itertools.chain(
            own.recently_destroyed_at(),
            *(p.recently_destroyed for p in parts),
        ),
        key=lambda entry: entry[0],
    )[-proj.destroyed_memory :]
    proj.recently_destroyed.clear()
    for _at, sid, value in destroyed:
        proj.recently_destroyed.adopt(ids.get(sid.int, sid), value)

    sent = [[(at, int.from_bytes(key, "big"), a) for at, key, a in p.commands] for p in parts]
    proj.commands = _commands(proj, [own.commands_at(), *sent], ids)
    proj.position = until
    proj.untrack()
    return proj


_Remembered = tuple[int, int, Accepted]


def _commands(
    proj: Projections, listed: list[list[_Remembered]], ids: dict[int, uuid.UUID]
) -> dict[int, Accepted]:
    """The newest commands of all partitions, in the order they were first seen, as
    many as a sequential fold's batched dropping leaves, each naming its session by the
    shared id object."""
    entries = sorted(itertools.chain.from_iterable(listed), key=operator.itemgetter(0))
    if len({key for _at, key, _a in entries}) < len(entries):
        entries = _combined(entries)
    kept = entries[len(entries) - proj.commands_kept(len(entries)) :]
    return {key: shared_session_id(a, ids) for _at, key, a in kept}


def _combined(entries: list[_Remembered]) -> list[_Remembered]:
    """One entry per command: a command's events are in one session and possibly the
    registry, so it can be remembered by two partitions. Its events add up, it is
    placed where first seen, and it names the session (as ``_remember`` does)."""
    by_id: dict[int, _Remembered] = {}
    for entry in entries:
        key = entry[1]
        seen = by_id.get(key)
        if seen is not None:
            at, _key, a = seen
            later = entry[2]
            named = later if later.session_id is not None or a.session_id is None else a
            entry = (  # noqa: PLW2901
                at,
                key,
                Accepted(
                    session_id=named.session_id,
                    version=named.version,
                    events=a.events + later.events,
                ),
            )
        by_id[key] = entry
    return list(by_id.values())
