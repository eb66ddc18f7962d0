"""The event loop's side of the writer: commits applied to the projections, in order.

The writer thread hands over each pass (what it saved and every job's outcome). Here,
on the event loop, each pass is applied to the projections and only then are its
callers resumed, so a caller always reads its own writes; then the commit listeners
(the outbox relay's wake-up) run, and every ``checkpoint_every`` events the projections
are checkpointed. Several coordinators may share one store: what this one did not write
is read from the notification log (``follow``) and applied the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from contracts import EventEnvelope
from coordinator.errors import CommandRejected, StoreUnavailable
from coordinator.read.loader import save_checkpoint
from coordinator.read.projections import Projections
from coordinator.service.writer import Outcome, WriteJob
from coordinator.store.eventstore import EventStore
from coordinator.store.watch import LogWatch

__all__ = ["CommitApplier", "CommitListener"]

log = logging.getLogger("sessionbus.coordinator")

CommitListener = Callable[[list[EventEnvelope]], None]
# (saved envelopes, resolved jobs, a log position to catch up to or None)
_Pass = tuple[list[EventEnvelope], list[tuple[WriteJob, Outcome]], int | None]


class CommitApplier:
    """Applies the writer's passes to the coordinator's current projections.

    ``projections`` is read on every pass (an operator's replay may swap them);
    ``after_apply`` runs once a pass is folded, before its callers resume (timeouts are
    armed from the final states there); ``before_checkpoint`` before each checkpoint,
    on its thread (the module-session lookup is written there)."""

    def __init__(
        self,
        store: EventStore,
        projections: Callable[[], Projections],
        *,
        page: int,
        checkpoint_every: int,
        after_apply: Callable[[], None],
        before_checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._projections = projections
        self._page = page
        self._checkpoint_every = checkpoint_every
        self._after_apply = after_apply
        self._before_checkpoint = before_checkpoint
        self._loop = asyncio.get_running_loop()
        self._passes: asyncio.Queue[_Pass] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.listeners: list[CommitListener] = []
        self.watch: LogWatch | None = None  # while following
        self.checkpointed_at = projections().position

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sessionbus-projections")

    async def stop(self) -> None:
        """Apply what is queued, then stop. Safe to call twice."""
        if self._task is None:
            return
        await self._passes.join()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    def deliver(self, saved: list[EventEnvelope], results: list[tuple[WriteJob, Outcome]]) -> None:
        """The writer's hand-over, called on the writer thread after each pass."""
        try:
            self._loop.call_soon_threadsafe(self._passes.put_nowait, (saved, results, None))
        except RuntimeError:
            # The loop is gone (its owner stopped without closing us): nobody waits.
            log.warning("commit of %d events not delivered: event loop closed", len(saved))

    def catch_up_to(self, position: int) -> None:
        """Have the projections read the log up to ``position`` (in turn with the passes)."""
        self._passes.put_nowait(([], [], position))

    def checkpoint(self) -> None:
        """Checkpoint the current projections (blocking)."""
        if self._before_checkpoint is not None:
            self._before_checkpoint()
        proj = self._projections()
        if save_checkpoint(self._store, proj):
            self.checkpointed_at = proj.position

    async def follow(self, interval: float) -> None:
        """Follow the shared notification log: another coordinator on the same store
        appends events this one did not write, and the projections must see them.
        Woken by the store's notifications (PostgreSQL), and looking every ``interval``
        seconds anyway (``LogWatch``)."""
        async with LogWatch(self._store) as watch:
            self.watch = watch
            while True:
                await watch.wait(interval)
                await self._look()

    async def _look(self) -> None:
        """Queue a catch-up if the log holds what the projections have not applied."""
        try:
            top = await asyncio.to_thread(self._store.max_position)
        except Exception as exc:  # noqa: BLE001 - the store may be away; try later
            log.warning("could not read the log position: %s", exc)
            return
        if top > self._projections().position:
            self.catch_up_to(top)

    async def _run(self) -> None:
        while True:
            saved, results, target = await self._passes.get()
            try:
                try:
                    await self._catch_up(saved)
                    if target is not None:
                        await self._read_up_to(target)
                    self._after_apply()
                finally:
                    # Callers first, then the relay: their replies are scheduled ahead
                    # of the publishing of the same events, which nobody is waiting
                    # on. Resolved even when the projections could not catch up (the
                    # store went away between the commit and the read): what was
                    # saved is saved, and the next commit or follow catches up.
                    _resolve(results)
                for listener in self.listeners:
                    try:
                        listener(saved)
                    except Exception:
                        log.exception("commit listener failed")
                position = self._projections().position
                if position - self.checkpointed_at >= self._checkpoint_every:
                    self.checkpointed_at = position
                    try:
                        await asyncio.to_thread(self.checkpoint)
                    except StoreUnavailable as exc:
                        log.warning("projection checkpoint not written: %s", exc)
            except Exception:
                log.exception("applying a commit failed")
            finally:
                self._passes.task_done()

    async def _catch_up(self, saved: list[EventEnvelope]) -> None:
        proj = self._projections()
        if not saved:
            return
        contiguous = saved[0].position == proj.position + 1 and all(
            b.position == (a.position or 0) + 1 for a, b in itertools.pairwise(saved)
        )
        if contiguous:
            proj.apply_all(saved)
            return
        # Someone else wrote in between (another coordinator), or ids have gaps:
        # follow the notification log itself up to what was just saved.
        await self._read_up_to(max(e.position or 0 for e in saved))

    async def _read_up_to(self, target: int) -> None:
        proj = self._projections()
        while proj.position < target:
            page = await asyncio.to_thread(self._store.read, proj.position, self._page)
            if not page:
                break
            proj.apply_all(page)


def _resolve(results: list[tuple[WriteJob, Outcome]]) -> None:
    for job, outcome in results:
        future = job.token
        if isinstance(future, asyncio.Future) and not future.done():
            if isinstance(outcome, CommandRejected):
                future.set_exception(outcome)
            else:
                future.set_result((outcome, job.actions))
