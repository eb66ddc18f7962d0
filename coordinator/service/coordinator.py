"""``SessionCoordinator``: the seed's coordinator as an async Python API.

Writes go to the single writer thread (group commit); reads come from the projections,
which the event loop updates after every commit before any waiting caller resumes, so a
caller always reads its own writes. ``execute`` is the one entry point the bus's command
server uses; the named methods are the same commands for in-process callers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

from contracts import (
    ACTIVE_STATUSES,
    REGISTRY_ID,
    WRITE_COMMANDS,
    Accepted,
    ChainVerdict,
    Command,
    CommandReply,
    CommandRequest,
    CoordinatorHealth,
    CreateWorkflowSession,
    Destroyed,
    DestroyWorkflowSession,
    ErrorCode,
    EventsPage,
    FindWorkflowSessions,
    GetCoordinatorHealth,
    GetIdentity,
    GetLinkedSessions,
    GetSessionHistory,
    GetWorkflowSession,
    HealthResult,
    Heartbeat,
    IdentityResult,
    IntegrityResult,
    Linked,
    LinkedSessions,
    LinkModuleSession,
    ListActiveWorkflowSessions,
    ListModules,
    ListWorkflowSessions,
    ModuleInfo,
    ModuleSessionConfig,
    ModulesResult,
    ReadEvents,
    RecordActivity,
    RegisterModule,
    RepairResult,
    RepairSessionIntegrity,
    ReportError,
    ReportOrphan,
    Result,
    SessionCreated,
    SessionEvent,
    SessionHistory,
    SessionIds,
    SessionIntegrityReport,
    SessionResult,
    SessionsPage,
    SessionStatus,
    StandardError,
    UnlinkModuleSession,
    UnregisterModule,
    UpdateSessionStatus,
    ValidateSessionIntegrity,
    WorkflowConfig,
    WorkflowSession,
    fold_history,
    new_id,
    verify_chain_raw,
)
from coordinator.domain.aggregates import OPERATOR, Principal, next_deadline
from coordinator.domain.clock import Clock, SystemClock
from coordinator.errors import (
    CommandRejected,
    ConfigurationError,
    CoordinatorError,
    StoreUnavailable,
)
from coordinator.read.loader import RebuildProgress, load_projections, save_checkpoint
from coordinator.read.projections import Projections, integrity_report
from coordinator.read.rebuild import MAX_PARTITIONS, PARALLEL_MIN_EVENTS, default_workers
from coordinator.service.commits import CommitApplier, CommitListener
from coordinator.service.links import ModuleSessionLookup
from coordinator.service.writer import WriteJob, Writer
from coordinator.store.eventstore import EventStore
from coordinator.store.watch import LogWatch

__all__ = ["CommitListener", "RebuildProgress", "SessionCoordinator"]

log = logging.getLogger("sessionbus.coordinator")

T = TypeVar("T")
WorkflowSessionCallback = Callable[[WorkflowSession], Awaitable[None]]
ModuleSessionLinkCallback = Callable[[uuid.UUID, str, uuid.UUID], Awaitable[None]]
# Young collections every 50k allocations instead of 700; full ones rarer still.
GC_THRESHOLDS: Final = (50_000, 20, 100)


class SessionCoordinator:
    """Centralized coordination of workflow sessions and module sessions.

    Use as ``async with SessionCoordinator("sqlite:///s.db") as coordinator: …``.
    ``principal`` is who in-process calls act as (default: an operator who may act for
    every module); the bus passes each command's own principal to ``execute``.
    ``tune_gc`` raises the process's garbage-collection thresholds on start (see
    ``GC_THRESHOLDS``): a coordinator owns its process; pass False when embedding it.
    """

    def __init__(
        self,
        store: str | EventStore | None = None,
        *,
        clock: Clock | None = None,
        principal: Principal = OPERATOR,
        max_batch: int = 512,
        checkpoint_every: int = 50_000,
        rebuild_page: int = 1000,
        rebuild_workers: int | None = None,
        parallel_rebuild_min: int = PARALLEL_MIN_EVENTS,
        progress: RebuildProgress | None = None,
        follow_interval: float | None = 1.0,
        follow_log: bool = True,
        tune_gc: bool = True,
    ) -> None:
        self._store_arg = store
        self.tune_gc = tune_gc
        self.clock: Clock = clock or SystemClock()
        self.principal = principal
        self.max_batch = max_batch
        self.checkpoint_every = checkpoint_every
        self.rebuild_page = rebuild_page
        self.rebuild_workers = default_workers() if rebuild_workers is None else rebuild_workers
        if not 1 <= self.rebuild_workers <= MAX_PARTITIONS:
            raise ConfigurationError(
                f"rebuild_workers must be 1 to {MAX_PARTITIONS}, not {rebuild_workers}"
            )
        self.parallel_rebuild_min = parallel_rebuild_min
        self.progress = progress
        self.follow_interval = follow_interval
        self.follow_log = follow_log
        self._follower: asyncio.Task[None] | None = None
        self._commits: CommitApplier | None = None
        self._links: ModuleSessionLookup | None = None
        self._touched: set[uuid.UUID] = set()
        self.store: EventStore | None = store if isinstance(store, EventStore) else None
        self._owns_store = not isinstance(store, EventStore)
        self.projections = Projections()
        # Commands answered through ``execute`` (the bus), for the health's figures.
        self.commands_handled = 0
        self._writer: Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._commit_listeners: list[CommitListener] = []
        self._handover: list[WriteJob] = []  # for the writer at the end of this loop pass
        self._created_callbacks: list[WorkflowSessionCallback] = []
        self._destroyed_callbacks: list[WorkflowSessionCallback] = []
        self._linked_callbacks: list[ModuleSessionLinkCallback] = []
        self._state = "new"
        self.published_position = 0
        self.rebuild_seconds = 0.0
        self.rebuilt_events = 0
        self.rebuild_processes = 0  # how many processes folded the last rebuild

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> SessionCoordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the store, rebuild projections (from a checkpoint when one exists),
        start the writer."""
        if self._state != "new":
            raise CoordinatorError(f"coordinator already {self._state}")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        if self.store is None:
            url = self._store_arg if isinstance(self._store_arg, str) else None
            self.store = await asyncio.to_thread(EventStore, url)
        store = self.store
        self.projections = await asyncio.to_thread(self._rebuild)
        if self.tune_gc:
            # The process holds a large, long-lived heap (read models, caches) and
            # allocates a few dozen short-lived containers per command; at CPython's
            # default thresholds collections took a third of a busy coordinator's CPU
            # (benchmarks/README.md, "Figures behind design choices").
            gc.set_threshold(*GC_THRESHOLDS)
        self.projections.listeners.append(self._on_session_event)
        proj = self.projections
        deadlines = proj.deadlines()
        links = self._links = ModuleSessionLookup(store)
        await links.start(proj)
        self._commits = CommitApplier(
            store,
            lambda: self.projections,
            page=self.rebuild_page,
            checkpoint_every=self.checkpoint_every,
            after_apply=self._arm_touched,
            before_checkpoint=self._write_links,
        )
        self._commits.listeners = self._commit_listeners
        self._commit_listeners.append(lambda _saved: links.after_commit())
        self._writer = Writer(
            store,
            self.clock,
            self._commits.deliver,
            max_batch=self.max_batch,
            applied=proj.applied_commands(),
            deadlines=deadlines,
            log_position=proj.position,
            follow_log=self.follow_log,
        )
        await asyncio.to_thread(self._writer.start)
        self._commits.start()
        if self.follow_interval is not None:
            self._follower = asyncio.create_task(
                self._commits.follow(self.follow_interval), name="sessionbus-follow"
            )
        self._state = "running"
        log.info(
            "coordinator started: %d events, %d live sessions, position %d",
            proj.events_applied,
            len(proj.sessions),
            proj.position,
        )

    async def drain(self) -> None:
        """Stop taking writes: finish what is queued and apply it to the projections.
        The store stays open (the relay still publishes from it). Safe to call twice."""
        if self._state != "running":
            return
        self._state = "draining"
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.stop)
        if self._commits is not None:
            await self._commits.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Drain, checkpoint the projections, close the store. Safe to call twice."""
        if self._state in {"closed", "new"}:
            self._state = "closed"
            return
        await self.drain()
        self._state = "closed"
        if self._links is not None:
            await self._links.close()
        if self.store is not None:
            try:
                await asyncio.to_thread(self._checkpoint)
            except StoreUnavailable as exc:
                # The next start folds the events after the last checkpoint instead.
                log.warning("projection checkpoint not written on close: %s", exc)
            if self._owns_store:
                await asyncio.to_thread(self.store.close)

    def _require_running(self) -> None:
        if self._state != "running":
            raise CoordinatorError(f"coordinator is {self._state}, not running")

    # -- projections ------------------------------------------------------------------

    def rebuild_from_scratch(self) -> Projections:
        """Fold the whole history into fresh projections, ignoring any checkpoint
        (``sessionctl replay``). Needs the store open; does not start anything."""
        return self._rebuild(from_checkpoint=False)

    def save_checkpoint(self) -> None:
        """Persist the projections as the checkpoint the next start resumes from."""
        self._checkpoint()

    def _rebuild(self, *, from_checkpoint: bool = True) -> Projections:
        assert self.store is not None
        loaded = load_projections(
            self.store,
            from_checkpoint=from_checkpoint,
            page=self.rebuild_page,
            workers=self.rebuild_workers,
            parallel_min=self.parallel_rebuild_min,
            progress=self.progress,
        )
        self.rebuild_seconds = loaded.seconds
        self.rebuilt_events = loaded.events
        self.rebuild_processes = loaded.processes
        return loaded.projections

    def _checkpoint(self) -> None:
        assert self.store is not None
        if self._commits is not None:
            self._commits.checkpoint()
        else:
            self._write_links()
            save_checkpoint(self.store, self.projections)

    def _write_links(self) -> None:
        """Store the module-session pairs gathered (blocking), so a checkpoint never
        runs ahead of the lookup; when that fails the checkpoint is written anyway (the
        next start reads the gap from the log)."""
        if self._links is None:
            return
        try:
            self._links.write()
        except StoreUnavailable as exc:
            log.warning("module-session lookup not written before the checkpoint: %s", exc)

    @property
    def log_watch(self) -> LogWatch | None:
        """What wakes this coordinator when another commits to the store (while it
        follows the log)."""
        return None if self._commits is None else self._commits.watch

    @property
    def fires_timeouts(self) -> bool:
        """Whether this coordinator fires timeouts (the store's leader does)."""
        return self._writer is not None and self._writer.fire_timeouts

    def set_fires_timeouts(self, value: bool) -> None:
        if self._writer is not None:
            self._writer.fire_timeouts = value
            self._writer.kick()

    def _arm_touched(self) -> None:
        """Arm the next timeout of every session a commit changed, from its final state
        after the commit (an intermediate state's deadline would outlive the session)."""
        touched, self._touched = self._touched, set()
        if self._writer is None:
            return
        sessions = self.projections.sessions
        for sid in touched:
            state = sessions.get(sid)
            if state is not None and (deadline := next_deadline(state)) is not None:
                self._writer.arm(sid, deadline)

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(envelopes)`` on the event loop after every commit (the outbox
        relay's wake-up)."""
        self._commit_listeners.append(listener)

    def _on_session_event(self, env: SessionEvent, state: WorkflowSession) -> None:
        self._touched.add(env.session_id)
        event = env.event
        if isinstance(event, SessionCreated):
            for cb in self._created_callbacks:
                self._spawn(cb(state))
        elif isinstance(event, Destroyed):
            for cb in self._destroyed_callbacks:
                self._spawn(cb(state))
        elif isinstance(event, Linked):
            for link_cb in self._linked_callbacks:
                self._spawn(link_cb(env.session_id, event.module_id, event.module_session_id))

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("lifecycle callback failed")

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the command entry point ------------------------------------------------------

    async def execute(
        self, request: CommandRequest, principal: Principal | None = None
    ) -> CommandReply:
        """Run one command and answer it; never raises for a bad command."""
        self.commands_handled += 1
        try:
            result = await self.handle(
                request.command,
                principal or self.principal,
                command_id=request.command_id,
                correlation_id=request.correlation_id,
            )
        except CommandRejected as rejected:
            return CommandReply(command_id=request.command_id, error=rejected.to_standard_error())
        except StoreUnavailable as exc:
            # A read that needs the store (a history, a session not held in memory).
            error = exc.rejection().to_standard_error()
            return CommandReply(command_id=request.command_id, error=error)
        except CoordinatorError as exc:
            error = StandardError(code=ErrorCode.UNAVAILABLE, message=str(exc), retryable=True)
            return CommandReply(command_id=request.command_id, error=error)
        return CommandReply(command_id=request.command_id, result=result)

    async def handle(
        self,
        command: Command,
        principal: Principal | None = None,
        *,
        command_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
    ) -> Result:
        """Run one command; raise ``CommandRejected`` when it breaks a rule."""
        self._require_running()
        principal = principal or self.principal
        if type(command) in WRITE_COMMANDS:
            if principal.read_only:
                raise CommandRejected(
                    ErrorCode.FORBIDDEN,
                    f"{principal.name!r} may only read (it may act for no module)",
                )
            accepted, actions = await self._write(command, principal, command_id, correlation_id)
            if isinstance(command, RepairSessionIntegrity):
                report = await self.validate_session_integrity(command.session_id)
                return RepairResult(actions=actions, report=report)
            return accepted
        if isinstance(command, GetIdentity):
            modules = None if principal.modules is None else sorted(principal.modules)
            return IdentityResult(
                user=principal.name, modules=modules, read_only=principal.read_only
            )
        return await self._read(command)

    async def _write(
        self,
        command: Command,
        principal: Principal,
        command_id: uuid.UUID | None,
        correlation_id: uuid.UUID | None,
    ) -> tuple[Accepted, list[str]]:
        assert self._writer is not None
        assert self._loop is not None
        future: asyncio.Future[tuple[Accepted, list[str]]] = self._loop.create_future()
        self._submit(
            WriteJob(
                command=command,
                principal=principal,
                command_id=command_id or new_id(),
                correlation_id=correlation_id,
                token=future,
            )
        )
        return await future

    def _submit(self, job: WriteJob) -> None:
        assert self._loop is not None
        if not self._handover:
            self._loop.call_soon(self._hand_over)
        self._handover.append(job)

    def _hand_over(self) -> None:
        """Give the writer every command of this pass of the event loop at once: a
        thread wake-up per command costs the loop more than the command's own work."""
        jobs, self._handover = self._handover, []
        if self._writer is not None and jobs:
            self._writer.submit_many(jobs)

    async def _read(self, command: Command) -> Result:
        proj = self.projections
        match command:
            case GetWorkflowSession():
                return SessionResult(session=await self.get_workflow_session(command.session_id))
            case ListActiveWorkflowSessions():
                return SessionIds(
                    session_ids=proj.active_session_ids(command.status, command.module_id)
                )
            case ListWorkflowSessions():
                return proj.sessions_page(
                    command.status,
                    command.module_id,
                    command.offset,
                    command.limit,
                    command.after,
                    query=command,
                )
            case FindWorkflowSessions():
                position = proj.position
                found = await self.find_workflow_sessions(command.match_id, command.limit)
                return SessionsPage(sessions=found, position=position)
            case GetLinkedSessions():
                return LinkedSessions(links=proj.linked_sessions(command.session_id))
            case ListModules():
                return ModulesResult(modules=proj.module_infos(self.clock.now()))
            case GetCoordinatorHealth():
                return HealthResult(health=self._health())
            case ValidateSessionIntegrity():
                return IntegrityResult(
                    report=await self.validate_session_integrity(command.session_id)
                )
            case GetSessionHistory():
                return await self._history(command)
            case ReadEvents():
                return await self._read_events(command)
        raise CommandRejected(
            ErrorCode.INVALID_MESSAGE, f"unknown command {type(command).__name__}"
        )

    # -- the seed's SessionCoordinator: workflow sessions ------------------------------

    async def create_workflow_session(
        self,
        steps: Sequence[str] = (),
        config: WorkflowConfig | None = None,
        *,
        session_id: uuid.UUID | None = None,
    ) -> WorkflowSession:
        """Create a workflow session (INITIALIZING until every required module links)."""
        accepted = await self.handle(
            CreateWorkflowSession(
                steps=list(steps), config=config or WorkflowConfig(), session_id=session_id
            )
        )
        assert isinstance(accepted, Accepted)
        assert accepted.session_id is not None
        session = await self.get_workflow_session(accepted.session_id)
        assert session is not None
        return session

    async def destroy_workflow_session(
        self, session_id: uuid.UUID, reason: str | None = None
    ) -> None:
        """Start CLEANUP; the session is destroyed once every module has unlinked."""
        await self.handle(DestroyWorkflowSession(session_id=session_id, reason=reason))

    async def get_workflow_session(self, session_id: uuid.UUID) -> WorkflowSession | None:
        """The session as projected; one not held (destroyed long ago, or never a
        workflow session) is read from its history in the store."""
        session = self.projections.get(session_id)
        if session is None and session_id != REGISTRY_ID:
            assert self.store is not None
            session = fold_history(await asyncio.to_thread(self.store.history, session_id))
        return session

    async def find_workflow_sessions(
        self, match_id: uuid.UUID, limit: int = 100
    ) -> list[WorkflowSession]:
        """Every workflow session, live or destroyed, whose id is ``match_id`` or that
        had a module session with that id linked, newest first (at most ``limit``).

        Memory first: live sessions by their links, the destroyed sessions still held
        by their own id, the links not yet stored; then the store's module-session
        lookup (a destroyed session's state holds no links). A session not held is
        read from its history."""
        proj = self.projections
        found: dict[int, uuid.UUID] = {sid.int: sid for sid in proj.sessions.find(match_id)}
        if match_id in proj.recently_destroyed:
            found[match_id.int] = match_id
        if self._links is not None:
            found.update((sid.int, sid) for sid in self._links.in_memory(match_id))
        assert self.store is not None
        stored = await asyncio.to_thread(self.store.workflow_sessions_of, match_id)
        found.update((sid.int, sid) for sid in stored)
        if not found:
            found[match_id.int] = match_id  # perhaps a workflow session destroyed long ago
        sessions = [s for sid in found.values() if (s := await self.get_workflow_session(sid))]
        sessions.sort(key=lambda s: (s.created_at, s.session_id.int), reverse=True)
        return sessions[:limit]

    def list_active_workflow_sessions(
        self, status: SessionStatus | None = None, module_id: str | None = None
    ) -> list[uuid.UUID]:
        """Ids of sessions INITIALIZING, ACTIVE or PAUSED (or in ``status``)."""
        return self.projections.active_session_ids(status, module_id)

    async def update_session_status(
        self,
        session_id: uuid.UUID,
        status: SessionStatus,
        *,
        module_id: str | None = None,
        reason: str | None = None,
    ) -> Accepted:
        """Seed rule 3: every status change goes through the coordinator."""
        return await self._accepted(
            UpdateSessionStatus(
                session_id=session_id, status=status, module_id=module_id, reason=reason
            )
        )

    async def record_activity(
        self, session_id: uuid.UUID, module_id: str | None = None
    ) -> Accepted:
        return await self._accepted(RecordActivity(session_id=session_id, module_id=module_id))

    async def report_error(
        self,
        session_id: uuid.UUID,
        error: StandardError,
        *,
        module_id: str | None = None,
        fatal: bool = True,
    ) -> Accepted:
        return await self._accepted(
            ReportError(session_id=session_id, error=error, module_id=module_id, fatal=fatal)
        )

    async def report_orphan(
        self, session_id: uuid.UUID, module_id: str, module_session_id: uuid.UUID
    ) -> Accepted:
        return await self._accepted(
            ReportOrphan(
                session_id=session_id, module_id=module_id, module_session_id=module_session_id
            )
        )

    # -- module registration ----------------------------------------------------------

    async def register_module(
        self, module_id: str, *, required: bool = True, capabilities: Sequence[str] = ()
    ) -> Accepted:
        return await self._accepted(
            RegisterModule(module_id=module_id, required=required, capabilities=list(capabilities))
        )

    async def unregister_module(self, module_id: str, reason: str | None = None) -> Accepted:
        return await self._accepted(UnregisterModule(module_id=module_id, reason=reason))

    def get_module(self, module_id: str) -> ModuleInfo | None:
        """What the coordinator knows of a module (the bus form of
        getModuleSessionManager: the manager itself lives in the module's process)."""
        for info in self.projections.module_infos(self.clock.now()):
            if info.module_id == module_id:
                return info
        return None

    def list_modules(self) -> list[ModuleInfo]:
        return self.projections.module_infos(self.clock.now())

    # -- cross-module coordination ----------------------------------------------------

    async def link_module_session(
        self,
        workflow_session_id: uuid.UUID,
        module_id: str,
        module_session_id: uuid.UUID,
        *,
        config: ModuleSessionConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Accepted:
        return await self._accepted(
            LinkModuleSession(
                session_id=workflow_session_id,
                module_id=module_id,
                module_session_id=module_session_id,
                config=config or ModuleSessionConfig(),
                metadata=metadata or {},
            )
        )

    async def unlink_module_session(
        self, workflow_session_id: uuid.UUID, module_id: str, reason: str | None = None
    ) -> Accepted:
        return await self._accepted(
            UnlinkModuleSession(session_id=workflow_session_id, module_id=module_id, reason=reason)
        )

    def get_linked_sessions(self, workflow_session_id: uuid.UUID) -> dict[str, uuid.UUID]:
        return self.projections.linked_sessions(workflow_session_id)

    # -- lifecycle events -------------------------------------------------------------

    def on_workflow_session_created(self, callback: WorkflowSessionCallback) -> None:
        self._created_callbacks.append(callback)

    def on_workflow_session_destroyed(self, callback: WorkflowSessionCallback) -> None:
        self._destroyed_callbacks.append(callback)

    def on_module_session_linked(self, callback: ModuleSessionLinkCallback) -> None:
        self._linked_callbacks.append(callback)

    # -- health and integrity ---------------------------------------------------------

    def record_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.projections.record_heartbeat(heartbeat, self.clock.now())

    async def get_coordinator_health(self) -> CoordinatorHealth:
        return self._health()

    def _health(self) -> CoordinatorHealth:
        proj = self.projections
        now = self.clock.now()
        counts = proj.status_counts()
        return CoordinatorHealth(
            total_workflow_sessions=len(proj.sessions) + proj.destroyed,
            active_workflow_sessions=sum(counts[s] for s in ACTIVE_STATUSES),
            registered_modules=sorted(proj.modules),
            module_health_status={m: proj.is_healthy(m, now) for m in sorted(proj.modules)},
            last_health_check=now,
            store_position=proj.position,
            published_position=self.published_position,
            sessions_by_status={status: n for status, n in counts.items() if n},
            commands_handled=self.commands_handled,
        )

    async def validate_session_integrity(self, session_id: uuid.UUID) -> SessionIntegrityReport:
        proj = self.projections
        if session_id in proj.sessions or session_id in proj.recently_destroyed:
            return proj.integrity(session_id)
        session = await self.get_workflow_session(session_id)
        return integrity_report(
            session_id, session, dict(proj.orphans.get(session_id, {})), set(proj.modules)
        )

    async def repair_session_integrity(self, session_id: uuid.UUID) -> RepairResult:
        result = await self.handle(RepairSessionIntegrity(session_id=session_id))
        assert isinstance(result, RepairResult)
        return result

    async def run_timeouts(self) -> None:
        """Fire every timeout due by the clock now, and wait until it is committed."""
        self._require_running()
        assert self._writer is not None
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._submit(WriteJob.barrier(future))
        await future

    # -- history ----------------------------------------------------------------------

    async def get_session_history(
        self,
        session_id: uuid.UUID,
        *,
        as_of: datetime | None = None,
        version: int | None = None,
    ) -> SessionHistory:
        return await self._history(
            GetSessionHistory(session_id=session_id, as_of=as_of, version=version)
        )

    async def _history(self, command: GetSessionHistory) -> SessionHistory:
        assert self.store is not None
        events = await asyncio.to_thread(self.store.history, command.session_id)
        if not events:
            raise CommandRejected(
                ErrorCode.UNKNOWN_SESSION,
                f"no history for session {command.session_id}",
                field="session_id",
            )
        if command.version is not None:
            events = [e for e in events if e.version <= command.version]
        if command.as_of is not None:
            events = [e for e in events if e.occurred_at <= command.as_of]
        try:
            state = fold_history(events)
        except CoordinatorError:
            state = None
        return SessionHistory(events=events, state=state if events else None)

    async def verify_history(self, session_id: uuid.UUID) -> ChainVerdict:
        """Recompute the hash chain of one session as stored (``ChainVerdict``)."""
        assert self.store is not None
        raw = await asyncio.to_thread(self.store.raw_history, session_id)
        return verify_chain_raw(raw)

    async def read_events(
        self, after_position: int = 0, limit: int = 1000, session_id: uuid.UUID | None = None
    ) -> EventsPage:
        return await self._read_events(
            ReadEvents(after_position=after_position, limit=limit, session_id=session_id)
        )

    async def _read_events(self, command: ReadEvents) -> EventsPage:
        assert self.store is not None
        page = await asyncio.to_thread(self.store.read, command.after_position, command.limit)
        next_position = (
            page[-1].position or command.after_position if page else command.after_position
        )
        if command.session_id is not None:
            page = [e for e in page if e.session_id == command.session_id]
        return EventsPage(events=page, next_position=next_position)

    async def _accepted(self, command: Command) -> Accepted:
        result = await self.handle(command)
        assert isinstance(result, Accepted)
        return result
