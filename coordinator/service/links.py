"""The module-session lookup: which workflow session each module session was linked to,
kept in the store, so a workflow session destroyed long ago is found by the id of one of
its module sessions (its final state holds no links, and the projections keep only the
newest destroyed sessions).

The projections hand over the pair of every Linked event they fold
(``Projections.new_links``). The pairs are written in batches off the event loop, never
one per command: after a pass of commits once ``batch`` have gathered, before every
projection checkpoint, and on close; until then they are searched in memory. The
lookup's record in the checkpoint table says up to which log position it holds every
pair, and moves in the same transaction as the rows. On start, what lies between that
position and the projections' is read from the log in the background (the whole log,
once, for a store written before the lookup existed); only then does the position move
with the live writes. A crash loses nothing: the next start reads the gap again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Final

from coordinator.errors import StoreUnavailable
from coordinator.read.projections import Projections
from coordinator.store.eventstore import EventStore

__all__ = ["LINK_BATCH", "ModuleSessionLookup"]

log = logging.getLogger("sessionbus.coordinator")

# Pairs gathered before a write: one transaction per this many Linked events.
LINK_BATCH: Final = 1000
# Log events read per query while filling the gap on start.
BACKFILL_PAGE: Final = 5000

_Pair = tuple[uuid.UUID, uuid.UUID]


class ModuleSessionLookup:
    """The coordinator's side of the store's module-session lookup (see the module)."""

    def __init__(self, store: EventStore, *, batch: int = LINK_BATCH) -> None:
        self.store = store
        self.batch = batch
        self._projections: Projections | None = None
        # One write at a time (the loop's, a checkpoint's on its thread, the gap's): a
        # batch that fails goes back to the pending pairs before the next write takes
        # them, so no write moves the position past a pair not yet stored.
        self._lock = threading.Lock()
        self._writing: list[_Pair] = []
        self._complete = threading.Event()  # stored pairs reach where live ones begin
        self._stopping = threading.Event()
        self._write_task: asyncio.Task[None] | None = None
        self._gap_task: asyncio.Task[None] | None = None

    @property
    def complete(self) -> bool:
        """Whether the stored lookup holds every pair up to the live ones."""
        return self._complete.is_set()

    async def start(self, projections: Projections) -> None:
        """Collect the pairs ``projections`` fold from now on; fill what the stored
        lookup lacks before them from the log, in the background."""
        self._projections = projections
        projections.new_links = []
        stored = await asyncio.to_thread(self.store.module_links_position)
        if stored >= projections.position:
            self._complete.set()
            return
        self._gap_task = asyncio.create_task(
            asyncio.to_thread(self._fill, stored, projections.position),
            name="sessionbus-module-links",
        )

    async def close(self) -> None:
        """Stop filling the gap (resumed on the next start) and wait for any write."""
        self._stopping.set()
        for task in (self._gap_task, self._write_task):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)

    def after_commit(self) -> None:
        """After a pass of commits (on the event loop): write once a batch gathered."""
        proj = self._projections
        if proj is None or proj.new_links is None or len(proj.new_links) < self.batch:
            return
        if self._write_task is None or self._write_task.done():
            self._write_task = asyncio.get_running_loop().create_task(
                self._write_in_thread(), name="sessionbus-module-links-write"
            )

    async def _write_in_thread(self) -> None:
        try:
            await asyncio.to_thread(self.write)
        except StoreUnavailable as exc:
            log.warning("module-session lookup not written (kept to retry): %s", exc)

    def write(self) -> None:
        """Store the pairs gathered so far (blocking; raises ``StoreUnavailable``, the
        pairs then kept for the next write)."""
        proj = self._projections
        if proj is None or proj.new_links is None:
            return
        with self._lock:
            # The position first: every pair folded up to it is in the list taken next.
            position = proj.position
            batch, proj.new_links = proj.new_links, []
            if not batch and not self.complete:
                return
            self._writing = batch
            try:
                self.store.add_module_links(batch, position if self.complete else None)
            except StoreUnavailable:
                proj.new_links[:0] = batch
                raise
            finally:
                self._writing = []

    def _fill(self, after: int, until: int) -> None:
        """Read the Linked pairs of the log in (``after``, ``until``] into the stored
        lookup, moving its position page by page (a stop resumes from there)."""
        log.info("module-session lookup: reading the log from %d to %d", after, until)
        try:
            for last, pairs in self.store.module_links(after, until, BACKFILL_PAGE):
                with self._lock:
                    self.store.add_module_links(pairs, last)
                if self._stopping.is_set():
                    return
            with self._lock:
                self.store.add_module_links([], until)
                self._complete.set()
        except StoreUnavailable as exc:
            # Read again from the stored position on the next start; meanwhile older
            # destroyed sessions may not be found by a module session's id.
            log.warning("module-session lookup incomplete (read on next start): %s", exc)
            return
        log.info("module-session lookup complete up to position %d", until)

    def in_memory(self, module_session_id: uuid.UUID) -> set[uuid.UUID]:
        """Workflow sessions linked to ``module_session_id`` by pairs not yet stored."""
        proj = self._projections
        pending = proj.new_links if proj is not None and proj.new_links is not None else []
        return {w for m, w in (*pending, *self._writing) if m == module_session_id}
