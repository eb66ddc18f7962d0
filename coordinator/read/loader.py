"""Loading the projections on start and checkpointing them.

A start reads the projection checkpoint if there is one, then folds every event after
it; a long history without a checkpoint is folded by several processes
(``coordinator.read.rebuild``). The garbage collector is paused while loading: the
objects made here live long, and a collection pass over them costs a large share of a
bulk replay. Afterwards they are frozen out of future collections and the allocator's
free memory is handed back (``coordinator.read.memory``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from coordinator.read.memory import release_free_memory
from coordinator.read.projections import Projections
from coordinator.read.rebuild import rebuild_partitioned
from coordinator.store.eventstore import EventStore

__all__ = ["CHECKPOINT_NAME", "Loaded", "RebuildProgress", "load_projections", "save_checkpoint"]

log = logging.getLogger("sessionbus.coordinator")

# The checkpoint's name in the store's checkpoint table.
CHECKPOINT_NAME: Final = "projections"

RebuildProgress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Loaded:
    projections: Projections
    seconds: float
    events: int  # folded from the log (0 when the checkpoint was current)
    processes: int  # how many processes folded them


def load_projections(
    store: EventStore,
    *,
    from_checkpoint: bool = True,
    page: int = 1000,
    workers: int = 1,
    parallel_min: int,
    progress: RebuildProgress | None = None,
) -> Loaded:
    """The projections as of the end of the log (blocking; run it off the event loop)."""
    started = time.perf_counter()
    proj = Projections()
    saved = store.checkpoints.get(CHECKPOINT_NAME) if from_checkpoint else None
    total = store.max_position()
    processes = 1
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if saved is not None:
            try:
                proj = Projections.decode_snapshot(saved[1])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("projection checkpoint unreadable (%s); rebuilding from history", exc)
                proj = Projections()
        if proj.position == 0 and total >= max(parallel_min, 1):
            merged = rebuild_partitioned(
                store, total, workers=workers, page=page, progress=progress
            )
            if merged is not None:
                proj, processes = merged, workers
        proj.begin_replay()
        for events in store.replay(proj.position, page):
            proj.apply_all(events)
            if progress is not None:
                progress(proj.position, total)
    finally:
        proj.end_replay()
        if gc_was_enabled:
            gc.enable()
        gc.freeze()
        release_free_memory()
    return Loaded(proj, time.perf_counter() - started, proj.events_applied, processes)


def save_checkpoint(store: EventStore, projections: Projections) -> bool:
    """Persist the projections for the next start to resume from (blocking). Returns
    False when there is nothing to save yet."""
    if projections.position == 0:
        return False
    data = projections.encode_snapshot()
    store.checkpoints.put(CHECKPOINT_NAME, projections.position, data)
    del data
    release_free_memory()
    return True
