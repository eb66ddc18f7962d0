"""The single writer: one thread that applies commands in batches (group commit).

eventsourcing is synchronous, so the coordinator runs it here, behind asyncio. Each
pass takes every queued command (up to ``max_batch``), applies each to its cached
aggregate, fires due timeouts, saves every touched aggregate in one transaction, then
hands the saved envelopes and the outcomes back to the event loop in one call.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_fixed,
)

from contracts import (
    REGISTRY_ID,
    Accepted,
    Command,
    CreateWorkflowSession,
    Destroyed,
    DestroyWorkflowSession,
    ErrorCode,
    EventEnvelope,
    LinkModuleSession,
    RecordActivity,
    RegisterModule,
    RepairSessionIntegrity,
    ReportError,
    ReportOrphan,
    SessionStatus,
    UnlinkModuleSession,
    UnregisterModule,
    UpdateSessionStatus,
    new_id,
)
from coordinator.domain.aggregates import (
    COORDINATOR,
    CommandContext,
    EnvelopeAggregate,
    Mark,
    ModuleRegistry,
    Principal,
    UnpackedStates,
    WorkflowSessionAggregate,
    require_module,
)
from coordinator.domain.clock import Clock
from coordinator.errors import CommandRejected, StoreUnavailable
from coordinator.read.projections import integrity_report
from coordinator.store.eventstore import EventStore, VersionConflict

__all__ = ["Outcome", "WriteJob", "Writer"]

log = logging.getLogger("sessionbus.coordinator.writer")

Outcome = Accepted | CommandRejected
Deliver = Callable[[list[EventEnvelope], list[tuple["WriteJob", Outcome]]], None]

_STOP: Final = object()
_CONFLICT_RETRIES: Final = 3
# Destroyed sessions remembered so that late timer arms for them are dropped.
_GONE_MEMORY: Final = 100_000
# After a failed commit, due timeouts are tried again this much later.
_RETRY_DELAY: Final = timedelta(seconds=1)
# How often an unreachable store is asked whether it is back (see Writer._probe_store).
_PROBE_INTERVAL: Final = 0.25
# A pass that took this long to find the store away spent it in connection retries.
_SLOW_FAILURE: Final = 1.0
_S = SessionStatus


@dataclass(frozen=True, slots=True)
class _Arm:
    session_id: uuid.UUID
    deadline: datetime


@dataclass(eq=False)
class WriteJob:
    """One write command on its way to the writer, with what to resolve when done."""

    command: Command | None
    principal: Principal
    command_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    token: Any = None
    actions: list[str] = field(default_factory=list)

    @classmethod
    def barrier(cls, token: Any) -> WriteJob:
        """A job with no command: resolved after the writer's next pass (which fires
        due timeouts), so a caller can wait for that pass."""
        return cls(command=None, principal=COORDINATOR, token=token)


class _JobScope:
    """The aggregates one command touched, with marks to roll them back."""

    def __init__(self) -> None:
        self.marks: dict[uuid.UUID, tuple[EnvelopeAggregate, Mark | None]] = {}

    def enter(self, aggregate: EnvelopeAggregate) -> None:
        if aggregate.id not in self.marks:
            self.marks[aggregate.id] = (aggregate, aggregate.mark())

    def enter_new(self, aggregate: EnvelopeAggregate) -> None:
        """An aggregate this command created: rolling back forgets it entirely."""
        self.marks[aggregate.id] = (aggregate, None)

    def events(self) -> int:
        return sum(a.unsaved - (m.pending if m else 0) for a, m in self.marks.values())

    def rollback(self) -> list[uuid.UUID]:
        """Undo the command; returns the ids of aggregates it had created."""
        created = []
        for aggregate, mark in self.marks.values():
            if mark is None:
                created.append(aggregate.id)
            else:
                aggregate.rollback(mark)
        return created


class Writer:
    """Owns the aggregates and is the only code that appends to the store."""

    def __init__(
        self,
        store: EventStore,
        clock: Clock,
        deliver: Deliver,
        *,
        max_batch: int = 512,
        cache_size: int = 20_000,
        applied: Iterable[tuple[uuid.UUID, Accepted]] = (),
        deadlines: Iterable[tuple[datetime, uuid.UUID]] = (),
        applied_memory: int = 100_000,
        log_position: int = 0,
        follow_log: bool = True,
    ) -> None:
        self.store = store
        self.clock = clock
        self.deliver = deliver
        self.max_batch = max_batch
        self.cache_size = cache_size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cache: OrderedDict[uuid.UUID, WorkflowSessionAggregate] = OrderedDict()
        # Cached aggregates hold their state packed, but for the most recently used.
        self._unpacked = UnpackedStates()
        self._registry: ModuleRegistry | None = None
        self._applied: OrderedDict[uuid.UUID, Accepted] = OrderedDict(applied)
        self._applied_memory = applied_memory
        # What repair commands reported, for identical replies to their retries.
        self._actions: dict[uuid.UUID, list[str]] = {}
        self._heap: list[tuple[datetime, uuid.UUID]] = []
        self._armed: dict[uuid.UUID, datetime] = {}
        for deadline, sid in deadlines:
            self._arm(sid, deadline)
        self._thread: threading.Thread | None = None
        # The notification log as far as this writer has seen it. Another coordinator
        # on the same store may append: before each pass the writer reads what it has
        # not seen, to know those commands' ids and drop aggregates they made stale.
        self._log_position = log_position
        self.follow_log = follow_log
        # Only the store's leader fires timeouts (see coordinator.leader).
        self.fire_timeouts = True
        self.batches = 0
        self.commands = 0
        self.foreign_events = 0
        self._gone: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._down_since: float | None = None  # when the store failed, while it is away
        # While the store is unreachable, a pass would spend seconds in the store's own
        # connection retries before failing again, and the callers queued behind it
        # would time out instead of hearing why: passes are refused at once instead,
        # and a probe thread asks the store until it answers.
        self._unreachable: StoreUnavailable | None = None
        self._probe: threading.Thread | None = None
        self._probe_stop = threading.Event()
        # After a version conflict: the pass again at once on fresh state (the other
        # writer has committed), up to _CONFLICT_RETRIES times. One writer thread
        # iterates it, a pass at a time.
        self._conflicts = Retrying(
            stop=stop_after_attempt(_CONFLICT_RETRIES),
            retry=retry_if_exception_type(VersionConflict),
            reraise=True,
        )
        self._submitting = threading.Lock()
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        self._registry = self.store.load_registry()
        self._thread = threading.Thread(target=self._run, name="sessionbus-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop; a job that arrives after that is refused
        (retryable), never left waiting. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._probe_stop.set()
        self._queue.put(_STOP)
        thread.join(timeout)
        with self._submitting:
            self._stopped = True
        left: list[WriteJob] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, WriteJob):
                left.append(item)
            elif isinstance(item, list):
                left.extend(item)
        self._refuse_stopped(left)

    def submit(self, job: WriteJob) -> None:
        self.submit_many([job])

    def submit_many(self, jobs: list[WriteJob]) -> None:
        """Jobs in one hand-over: one wake-up of this thread, not one each."""
        with self._submitting:
            if not self._stopped:
                self._queue.put(jobs)
                return
        self._refuse_stopped(jobs)

    def _refuse_stopped(self, jobs: list[WriteJob]) -> None:
        if jobs:
            error = CommandRejected(
                ErrorCode.UNAVAILABLE, "the coordinator is stopping", retryable=True
            )
            self.deliver([], [(job, error) for job in jobs])

    def kick(self) -> None:
        """Wake the thread to fire due timeouts now (the clock may have moved)."""
        self._queue.put(None)

    def arm(self, session_id: uuid.UUID, deadline: datetime) -> None:
        """Arm a session's next timeout (thread-safe: the projections call this for
        every session they see change, this coordinator's writes or another's)."""
        self._queue.put(_Arm(session_id, deadline))

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._wait_seconds())
            except queue.Empty:
                first = None
            batch: list[WriteJob] = []
            for item in self._drain(first):
                if item is _STOP:
                    stopping = True
                elif isinstance(item, WriteJob):
                    batch.append(item)
                elif isinstance(item, list):
                    batch.extend(item)
                elif isinstance(item, _Arm) and item.session_id not in self._gone:
                    self._arm(item.session_id, item.deadline)
            self._process(batch)  # delivers every job, whatever fails

    def _drain(self, first: Any) -> Iterable[Any]:
        yield first
        for _ in range(self.max_batch - 1):
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _wait_seconds(self) -> float:
        if not self._heap or self._unreachable is not None:
            return 1.0
        delta = (self._heap[0][0] - self.clock.now()).total_seconds()
        return min(1.0, max(0.0, delta))

    def _process(self, batch: list[WriteJob]) -> None:
        """One pass. Whatever fails in it, every job of the batch gets an outcome and
        is delivered: a caller never waits on a pass that died."""
        outcomes: list[Outcome] = []
        saved: list[EventEnvelope] = []
        touched: dict[uuid.UUID, EnvelopeAggregate] = {}
        fired: list[tuple[datetime, uuid.UUID]] = []
        started = time.monotonic()
        try:
            self._check_reachable()
            if self.follow_log:
                # Unread foreign events may hold a retried command's id: without them
                # a retry would be applied a second time, so the pass waits for them.
                self._follow()
            outcomes, saved = self._commit(batch, touched, fired)
            if saved:
                self._store_back()
        except Exception as exc:  # noqa: BLE001 - every job gets an outcome, whatever failed
            outcomes = self._failed_pass(exc, batch, touched, fired, started)
            touched, saved = {}, []
        finally:
            if len(outcomes) != len(batch):  # an exception no handler above took
                outcomes = [CommandRejected(ErrorCode.INTERNAL, "writer pass interrupted")] * len(
                    batch
                )
                touched, saved = {}, []
            try:
                if saved and saved[0].position == self._log_position + 1:
                    self._log_position = saved[-1].position or self._log_position
                self._after_commit(batch, outcomes, touched)
            finally:
                self.batches += 1
                self.commands += len(batch)
                self.deliver(saved, list(zip(batch, outcomes, strict=True)))

    def _failed_pass(
        self,
        exc: Exception,
        batch: list[WriteJob],
        touched: dict[uuid.UUID, EnvelopeAggregate],
        fired: list[tuple[datetime, uuid.UUID]],
        started: float,
    ) -> list[Outcome]:
        """Undo what a failed pass did in memory and give each job its error: nothing
        of the pass was saved (``EventStore.save`` is one transaction and the last step
        that can fail)."""
        self._evict(touched)
        self._rearm(fired, backoff=True)
        if not isinstance(exc, StoreUnavailable):
            log.error("writer pass of %d commands failed", len(batch), exc_info=exc)
            error = CommandRejected(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
            return [error] * len(batch)
        self._store_down(exc, len(batch))
        slow = time.monotonic() - started >= _SLOW_FAILURE
        if slow and type(exc) is StoreUnavailable and self._unreachable is None:
            # Not a refusal the store answered (full, read-only, locked …), nor a
            # quick one: it did not answer, after seconds of retries.
            self._unreachable = exc
            self._start_probe()
        return [exc.rejection()] * len(batch)

    def _commit(
        self,
        batch: list[WriteJob],
        touched: dict[uuid.UUID, EnvelopeAggregate],
        fired: list[tuple[datetime, uuid.UUID]],
    ) -> tuple[list[Outcome], list[EventEnvelope]]:
        """Apply the batch and fire due timeouts, then save all in one transaction;
        on a version conflict, again on fresh state. ``touched`` (the aggregates with
        pending events) and ``fired`` (the deadlines taken off the heap) are the
        caller's, to undo if the pass fails."""
        # The first try outside tenacity: nearly every pass needs no other, and the
        # retry machinery costs more than a small pass (0.09-0.12 ms a pass, measured here).
        with contextlib.suppress(VersionConflict):
            return self._attempt(batch, touched, fired, 1)
        outcomes: list[Outcome] = []
        saved: list[EventEnvelope] = []
        try:
            for attempt in self._conflicts:
                with attempt:
                    number = attempt.retry_state.attempt_number + 1
                    outcomes, saved = self._attempt(batch, touched, fired, number)
        except VersionConflict as exc:
            touched.clear()  # nothing of this pass was saved
            error = CommandRejected(
                ErrorCode.CONFLICT, f"conflicting writes: {exc}", retryable=True
            )
            outcomes = [error] * len(batch)
        return outcomes, saved

    def _attempt(
        self,
        batch: list[WriteJob],
        touched: dict[uuid.UUID, EnvelopeAggregate],
        fired: list[tuple[datetime, uuid.UUID]],
        number: int,
    ) -> tuple[list[Outcome], list[EventEnvelope]]:
        """One try of ``_commit``: apply, fire, save; ``VersionConflict`` out, undone."""
        touched.clear()
        fired.clear()
        outcomes = self._apply_batch(batch, touched, recheck=number > 1)
        # A clock that only moves when told (tests) fires timeouts only in passes
        # that carry a job, so a test decides when they fire; a real clock's
        # idle wake-ups fire them too.
        if bool(batch) or getattr(self.clock, "autonomous", True):
            self._fire_timeouts(touched, fired)
        pending = [a for a in touched.values() if a.unsaved]
        if not pending:
            return outcomes, []
        try:
            started = time.perf_counter()
            saved = self.store.save(pending)
        except VersionConflict as exc:
            # Another writer appended first: reload and apply again; a command
            # that is no longer valid then gets its own error.
            log.warning("version conflict (attempt %d): %s", number, exc)
            self._evict(touched)
            # The timeouts fired in vain: fire them again on the retry (after a
            # pause once this pass gives up).
            self._rearm(fired, backoff=number > _CONFLICT_RETRIES)
            fired.clear()
            raise
        log.debug(
            "saved %d events of %d commands in %.1f ms",
            len(saved),
            len(batch),
            (time.perf_counter() - started) * 1000,
        )
        return outcomes, saved

    def _store_down(self, exc: StoreUnavailable, commands: int) -> None:
        """Log an outage when it starts (and what it refused), not every pass of it."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("event store unavailable (%s): %s", exc.reason, exc)
        if commands:
            log.debug("%d commands refused: store unavailable (%s)", commands, exc.reason)

    def _check_reachable(self) -> None:
        unreachable = self._unreachable
        if unreachable is not None:
            raise type(unreachable)(str(unreachable))

    def _start_probe(self) -> None:
        if self._probe is None or not self._probe.is_alive():
            self._probe = threading.Thread(
                target=self._probe_store, name="sessionbus-writer-probe", daemon=True
            )
            self._probe.start()

    def _probe_store(self) -> None:
        """Ask the store for its position until it answers, then let passes through."""
        probe = Retrying(
            wait=wait_fixed(_PROBE_INTERVAL),
            sleep=self._probe_pause,
            retry=retry_if_exception_type(Exception),
            before_sleep=_unexpected_probe_failure,
        )
        try:
            self._probe_pause(_PROBE_INTERVAL)
            probe(self.store.max_position)
        except _ProbeStopped:
            return
        log.info("event store answers again; writes resume")
        self._unreachable = None
        self.kick()

    def _probe_pause(self, seconds: float) -> None:
        """The probe's pause is the stop event's wait: stopping ends the probe at once."""
        if self._probe_stop.wait(seconds):
            raise _ProbeStopped

    def _store_back(self) -> None:
        if self._down_since is not None:
            log.warning(
                "event store available again after %.1f s", time.monotonic() - self._down_since
            )
            self._down_since = None

    def _after_commit(
        self, batch: list[WriteJob], outcomes: list[Outcome], touched: dict[uuid.UUID, Any]
    ) -> None:
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Accepted) and job.command_id is not None:
                self._applied[job.command_id] = outcome
                if job.actions:
                    self._actions[job.command_id] = list(job.actions)
                if len(self._applied) > self._applied_memory:
                    self._actions.pop(next(iter(self._applied)), None)
                    self._applied.popitem(last=False)
        for aggregate in touched.values():
            if isinstance(aggregate, WorkflowSessionAggregate):
                if aggregate.state.destroyed:
                    self._cache.pop(aggregate.id, None)
                    self._armed.pop(aggregate.id, None)
                    # An arm for it may still be queued (sent for an earlier state).
                    self._gone[aggregate.id] = None
                    if len(self._gone) > _GONE_MEMORY:
                        self._gone.popitem(last=False)
                else:
                    deadline = aggregate.next_deadline()
                    if deadline is not None:
                        self._arm(aggregate.id, deadline)

    # -- other writers ----------------------------------------------------------------

    def _follow(self) -> None:
        """Read what others appended since we last looked: remember their command ids
        (a retry that reaches us after a failover is answered, not applied again) and
        forget cached aggregates they moved past."""
        top = self.store.max_position()
        if top <= self._log_position:
            return
        counts: dict[uuid.UUID, Accepted] = {}
        while self._log_position < top:
            page = self.store.read(self._log_position, 1000)
            if not page:
                break
            for env in page:
                self._observe(env, counts)
            self._log_position = page[-1].position or top
        for command_id, accepted in counts.items():
            self._applied[command_id] = accepted
            if len(self._applied) > self._applied_memory:
                self._actions.pop(next(iter(self._applied)), None)
                self._applied.popitem(last=False)

    def _observe(self, env: EventEnvelope, counts: dict[uuid.UUID, Accepted]) -> None:
        self.foreign_events += 1
        command_id = env.causation_id
        if command_id is not None and command_id not in self._applied:
            seen = counts.get(command_id)
            registry = env.session_id == REGISTRY_ID
            if seen is not None and seen.session_id is not None and registry:
                counts[command_id] = Accepted(
                    session_id=seen.session_id, version=seen.version, events=seen.events + 1
                )
            else:
                counts[command_id] = Accepted(
                    session_id=None if registry else env.session_id,
                    version=env.version,
                    events=(seen.events if seen else 0) + 1,
                )
        if env.session_id == REGISTRY_ID:
            if self._registry is not None and self._registry.version < env.version:
                self._registry = None
            return
        cached = self._cache.get(env.session_id)
        if cached is not None and cached.version < env.version:
            del self._cache[env.session_id]

    # -- aggregates -------------------------------------------------------------------

    def registry(self) -> ModuleRegistry:
        if self._registry is None:
            self._registry = self.store.load_registry()
        return self._registry

    def _session(self, session_id: uuid.UUID) -> WorkflowSessionAggregate | None:
        aggregate = self._cache.get(session_id)
        if aggregate is not None:
            self._cache.move_to_end(session_id)
            self._unpacked.used(aggregate)
            return aggregate
        loaded = self.store.load(session_id)
        if loaded is None:
            return None
        if not isinstance(loaded, WorkflowSessionAggregate):
            return None
        self._cache_put(loaded)
        return loaded

    def _cache_put(self, aggregate: WorkflowSessionAggregate) -> None:
        self._cache[aggregate.id] = aggregate
        self._unpacked.used(aggregate)
        while len(self._cache) > self.cache_size:
            victim_id, victim = next(iter(self._cache.items()))
            if victim.unsaved:
                break  # unsaved work stays until the commit
            del self._cache[victim_id]

    def _evict(self, touched: dict[uuid.UUID, EnvelopeAggregate]) -> None:
        for aggregate_id, aggregate in touched.items():
            aggregate.discard_pending()
            if isinstance(aggregate, ModuleRegistry):
                self._registry = None
            else:
                self._cache.pop(aggregate_id, None)

    # -- timeouts ---------------------------------------------------------------------

    def _arm(self, session_id: uuid.UUID, deadline: datetime) -> None:
        armed = self._armed.get(session_id)
        if armed is None or deadline < armed:
            self._armed[session_id] = deadline
            heapq.heappush(self._heap, (deadline, session_id))

    def _rearm(self, fired: list[tuple[datetime, uuid.UUID]], *, backoff: bool) -> None:
        """Arm again deadlines whose timeouts were not saved (a failed commit), so a
        later pass fires them instead of dropping them. With ``backoff``, not before
        ``_RETRY_DELAY`` from now, so an unreachable store is not retried in a loop."""
        floor = self.clock.now() + _RETRY_DELAY if backoff else None
        for deadline, sid in fired:
            self._arm(sid, max(deadline, floor) if floor is not None else deadline)

    def _fire_timeouts(
        self,
        touched: dict[uuid.UUID, EnvelopeAggregate],
        fired: list[tuple[datetime, uuid.UUID]],
    ) -> None:
        """Run every timeout due now; ``fired`` gets each deadline taken off the heap
        before its session is loaded, so a load that fails leaves it to be armed again."""
        if not self.fire_timeouts:
            return
        now = self.clock.now()
        ctx = CommandContext(COORDINATOR, now, correlation_id=None)
        while self._heap and self._heap[0][0] <= now:
            deadline, sid = heapq.heappop(self._heap)
            if self._armed.get(sid) != deadline:
                continue  # superseded by an earlier deadline already handled
            del self._armed[sid]
            fired.append((deadline, sid))
            aggregate = self._session(sid)
            if aggregate is None or aggregate.state.destroyed:
                continue
            scope = _JobScope()
            scope.enter(aggregate)
            registry = self.registry()
            scope.enter(registry)
            try:
                aggregate.run_timeouts(ctx)
                self._record_orphans(ctx, aggregate, registry)
            except Exception:
                log.exception("timeout handling failed", extra={"session_id": sid})
                self._rollback(scope)
                continue
            if scope.events():
                touched[aggregate.id] = aggregate
                if registry.unsaved:
                    touched[registry.id] = registry
            later = aggregate.next_deadline()
            if later is not None and not aggregate.state.destroyed:
                self._arm(sid, later)

    @staticmethod
    def _record_orphans(
        ctx: CommandContext, session: WorkflowSessionAggregate, registry: ModuleRegistry
    ) -> None:
        """Module sessions a cleanup timeout left behind become registry orphans, so
        integrity reports and repair find them in one place."""
        for env in session.pending_envelopes():
            if isinstance(env.event, Destroyed):
                for module_id, module_session_id in sorted(env.event.orphaned.items()):
                    registry.report_orphan(ctx, module_id, session.id, module_session_id)

    # -- commands ---------------------------------------------------------------------

    def _apply_batch(
        self, batch: list[WriteJob], touched: dict[uuid.UUID, EnvelopeAggregate], *, recheck: bool
    ) -> list[Outcome]:
        """Apply every job of a pass. Copies of one command in the same pass (a client
        that sent it again while the first copy waited, as it does while the store is
        away) get the first copy's outcome: it is not applied yet when they come, so
        the memory of applied commands cannot answer them."""
        first: dict[uuid.UUID, tuple[WriteJob, Outcome]] = {}
        outcomes: list[Outcome] = []
        for job in batch:
            seen = first.get(job.command_id) if job.command_id is not None else None
            if seen is not None and job.command is not None:
                job.actions[:] = seen[0].actions
                outcomes.append(seen[1])
                continue
            outcome = self._apply(job, touched, recheck=recheck)
            if job.command_id is not None and job.command is not None:
                first[job.command_id] = (job, outcome)
            outcomes.append(outcome)
        return outcomes

    def _apply(
        self, job: WriteJob, touched: dict[uuid.UUID, EnvelopeAggregate], *, recheck: bool
    ) -> Outcome:
        if job.command is None:
            return Accepted()
        if job.command_id is not None:
            done = self._applied.get(job.command_id)
            if done is not None:
                # A retry: the same answer, including what a repair said it did.
                job.actions[:] = self._actions.get(job.command_id, [])
                return done
        ctx = CommandContext(job.principal, self.clock.now(), job.command_id, job.correlation_id)
        scope = _JobScope()
        job.actions.clear()
        try:
            primary = self._dispatch(job, ctx, scope, recheck=recheck)
        except CommandRejected as rejected:
            self._rollback(scope)
            return rejected
        except StoreUnavailable:
            # Loading an aggregate failed: the whole pass is refused (see _process).
            self._rollback(scope)
            raise
        except Exception as exc:
            log.exception(
                "command %s failed",
                type(job.command).__name__,
                extra={
                    "command_id": job.command_id,
                    "session_id": getattr(job.command, "session_id", None),
                },
            )
            self._rollback(scope)
            return CommandRejected(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        for aggregate, _mark in scope.marks.values():
            if aggregate.unsaved:
                touched[aggregate.id] = aggregate
        # A registry write names no workflow session: the same reply the projections
        # rebuild from the events (so a retry after a restart is answered identically).
        return Accepted(
            session_id=primary.id if isinstance(primary, WorkflowSessionAggregate) else None,
            version=primary.version if primary is not None else 0,
            events=scope.events(),
        )

    def _rollback(self, scope: _JobScope) -> None:
        for created in scope.rollback():
            self._cache.pop(created, None)

    def _load(self, session_id: uuid.UUID, scope: _JobScope) -> WorkflowSessionAggregate:
        aggregate = self._session(session_id)
        if aggregate is None:
            raise CommandRejected(
                ErrorCode.UNKNOWN_SESSION,
                f"no workflow session {session_id}",
                field="session_id",
            )
        scope.enter(aggregate)
        return aggregate

    def _dispatch(
        self, job: WriteJob, ctx: CommandContext, scope: _JobScope, *, recheck: bool
    ) -> EnvelopeAggregate | None:
        cmd = job.command
        registry = self.registry()
        scope.enter(registry)
        match cmd:
            case CreateWorkflowSession():
                return self._create(cmd, ctx, scope, registry, recheck=recheck)
            case LinkModuleSession():
                session = self._load(cmd.session_id, scope)
                session.link(
                    ctx, cmd.module_id, cmd.module_session_id, cmd.config, cmd.metadata, registry
                )
                return session
            case UnlinkModuleSession():
                session = self._load(cmd.session_id, scope)
                session.unlink(ctx, cmd.module_id, cmd.reason)
                return session
            case UpdateSessionStatus():
                session = self._load(cmd.session_id, scope)
                if cmd.module_id is None:
                    session.set_status(ctx, cmd.status, cmd.reason)
                else:
                    session.set_module_status(ctx, cmd.module_id, cmd.status, cmd.reason)
                return session
            case RecordActivity():
                session = self._load(cmd.session_id, scope)
                session.record_activity(ctx, cmd.module_id)
                return session
            case ReportError():
                session = self._load(cmd.session_id, scope)
                session.report_error(ctx, cmd.module_id, cmd.error, cmd.fatal)
                return session
            case DestroyWorkflowSession():
                session = self._load(cmd.session_id, scope)
                session.destroy(ctx, cmd.reason)
                return session
            case ReportOrphan():
                self._report_orphan(cmd, ctx, scope, registry)
                return registry
            case RepairSessionIntegrity():
                return self._repair(cmd, job, ctx, scope, registry)
            case RegisterModule():
                registry.register(ctx, cmd.module_id, cmd.required, list(cmd.capabilities))
                return registry
            case UnregisterModule():
                registry.unregister(ctx, cmd.module_id, cmd.reason)
                return registry
        raise CommandRejected(
            ErrorCode.INVALID_MESSAGE, f"{type(cmd).__name__} is not a write command"
        )

    def _create(
        self,
        cmd: CreateWorkflowSession,
        ctx: CommandContext,
        scope: _JobScope,
        registry: ModuleRegistry,
        *,
        recheck: bool,
    ) -> WorkflowSessionAggregate:
        sid = cmd.session_id or new_id()
        # A client-chosen id that exists is refused. Only ids the cache does not know
        # are looked up, and only on a retry after a conflict: a first save of an
        # existing id fails on the store's unique version and comes back here.
        exists = sid in self._cache or (
            cmd.session_id is not None and recheck and self.store.load(sid) is not None
        )
        if exists:
            raise CommandRejected(
                ErrorCode.SESSION_EXISTS,
                f"workflow session {sid} already exists",
                field="session_id",
            )
        session = WorkflowSessionAggregate.create(ctx, sid, list(cmd.steps), cmd.config, registry)
        scope.enter_new(session)
        self._cache_put(session)
        return session

    def _report_orphan(
        self, cmd: ReportOrphan, ctx: CommandContext, scope: _JobScope, registry: ModuleRegistry
    ) -> None:
        # Who may report comes first: the check below would otherwise answer anyone
        # with another module's links.
        require_module(ctx, cmd.module_id)
        session = self._session(cmd.session_id)
        if session is not None and not session.state.destroyed:
            info = session.state.modules.get(cmd.module_id)
            if info is not None and info.session_id == cmd.module_session_id:
                raise CommandRejected(
                    ErrorCode.CONFLICT,
                    f"{cmd.module_id} session {cmd.module_session_id} is linked to live "
                    f"session {cmd.session_id}: not an orphan",
                    module_id=cmd.module_id,
                )
        registry.report_orphan(ctx, cmd.module_id, cmd.session_id, cmd.module_session_id)

    def _repair(
        self,
        cmd: RepairSessionIntegrity,
        job: WriteJob,
        ctx: CommandContext,
        scope: _JobScope,
        registry: ModuleRegistry,
    ) -> EnvelopeAggregate:
        session = self._session(cmd.session_id)
        orphans = {o.module_id: o.module_session_id for o in registry.orphans_of(cmd.session_id)}
        state = session.state if session is not None else None
        report = integrity_report(cmd.session_id, state, orphans, set(registry.state.modules))
        for orphan in registry.orphans_of(cmd.session_id):
            registry.request_orphan_cleanup(ctx, orphan)
            job.actions.append(
                f"asked {orphan.module_id} to destroy orphaned session {orphan.module_session_id}"
            )
        if session is None or session.state.destroyed:
            return registry
        scope.enter(session)
        live = session.state.status in (_S.INITIALIZING, _S.ACTIVE, _S.PAUSED)
        if live and report.missing_links and session.state.status is not _S.INITIALIZING:
            session.fail(
                ctx,
                ErrorCode.MODULE_NOT_LINKED,
                "integrity repair: required modules not linked: " + ", ".join(report.missing_links),
            )
            job.actions.append("failed the session: required modules not linked")
        elif report.inconsistent_statuses:
            required = set(session.state.required_modules)
            if live and required & report.inconsistent_statuses.keys():
                names = ", ".join(sorted(required & report.inconsistent_statuses.keys()))
                session.fail(ctx, ErrorCode.MODULE_ERROR, f"integrity repair: {names} failed")
                job.actions.append(f"failed the session: required {names} failed")
            elif live:
                for module_id in sorted(report.inconsistent_statuses):
                    session.unlink(ctx, module_id, "integrity repair")
                    job.actions.append(f"unlinked {module_id}")
            else:
                session.destroy(ctx, "integrity repair")
                job.actions.append("started cleanup of the session")
        if not job.actions:
            job.actions.append("nothing to repair")
        return session


class _ProbeStopped(Exception):
    """The writer stopped while its store probe waited."""


def _unexpected_probe_failure(state: RetryCallState) -> None:
    """A store that is away is what the probe waits out; anything else is logged."""
    error = state.outcome.exception() if state.outcome is not None else None
    if error is not None and not isinstance(error, StoreUnavailable):
        log.error("store probe failed", exc_info=error)
