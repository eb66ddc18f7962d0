"""``SessionManager``: the seed's ISessionManager for one module, on the bus.

A module subclasses it, sets ``module_id`` and writes two hooks: ``on_create`` (make the
module's own session for a workflow session) and ``on_destroy`` (tear it down). The
manager registers the module, keeps a local projection of every session from the
events it consumes (so reads are synchronous and local), and calls the hooks when the
coordinator's events ask for them: a new workflow session → create and link; CLEANUP →
destroy and unlink; an orphan clean-up request → destroy. Writes go to the coordinator
(seed rule 3). Lifecycle callbacks are always wired (seed rule 5): the defaults log.

Events the module learns as history — loaded at start, or fetched from the coordinator
to fill a gap or for a session destroyed before the listing — are folded first, and the
hooks and callbacks react once to the state they lead to: a session destroyed while the
module was away gets no create, no link and no second destroy; one still waiting for
the module gets its create once. ``on_destroy`` runs at most once per module session.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Self

from contracts import (
    ACTIVE_STATUSES,
    REGISTRY_ID,
    Codec,
    Destroyed,
    ErrorCode,
    ErrorReported,
    EventEnvelope,
    Heartbeat,
    Linked,
    ModuleSessionConfig,
    ModuleSessionInfo,
    OrphanCleanupRequested,
    SessionCreated,
    SessionManagerHealth,
    SessionStatus,
    StandardError,
    StatusChanged,
    Topology,
    Unlinked,
    WorkflowSession,
    fold_session,
    new_id,
    parse_module_id,
)
from module_sdk.client import CoordinatorClient, connection_settings
from module_sdk.consumer import EventConsumer
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, SdkError
from module_sdk.retrying import retrying
from transport.amqp import AmqpTransport
from transport.port import OutgoingMessage, Transport, TransportError
from transport.settings import Settings

__all__ = ["SessionLifecycleCallbacks", "SessionManager"]

log = logging.getLogger("sessionbus.module_sdk")

_S = SessionStatus
_DESTROYED_MEMORY: Final = 100_000
_RELEASED_MEMORY: Final = 100_000
_ERROR_MEMORY: Final = 20

CreatedCallback = Callable[[str, uuid.UUID, uuid.UUID], Awaitable[None]]
StatusCallback = Callable[[str, uuid.UUID, SessionStatus, SessionStatus], Awaitable[None]]
DestroyedCallback = Callable[[str, uuid.UUID], Awaitable[None]]
ErrorCallback = Callable[[str, uuid.UUID, StandardError], Awaitable[None]]


def _command_id(module_session_id: uuid.UUID, action: str) -> uuid.UUID:
    """One command id for every try of one link (or unlink) of a module session: a try
    sent again after its reply was lost (the event redelivered) is answered as the
    first was, not refused because the session has moved on since."""
    return uuid.uuid5(module_session_id, action)


async def _log_created(module_id: str, wsid: uuid.UUID, module_session_id: uuid.UUID) -> None:
    log.info("%s: session %s linked to workflow session %s", module_id, module_session_id, wsid)


async def _log_status(
    module_id: str, wsid: uuid.UUID, old: SessionStatus, new: SessionStatus
) -> None:
    log.info("%s: workflow session %s %s -> %s", module_id, wsid, old, new)


async def _log_destroyed(module_id: str, wsid: uuid.UUID) -> None:
    log.info("%s: workflow session %s destroyed", module_id, wsid)


async def _log_error(module_id: str, wsid: uuid.UUID, error: StandardError) -> None:
    log.warning("%s: workflow session %s error %s: %s", module_id, wsid, error.code, error.message)


@dataclass
class SessionLifecycleCallbacks:
    """The seed's SessionLifecycleCallbacks. Every one is always set."""

    on_session_created: CreatedCallback = _log_created
    on_session_status_changed: StatusCallback = _log_status
    on_session_destroyed: DestroyedCallback = _log_destroyed
    on_session_error: ErrorCallback = _log_error


class SessionManager:
    """Base class of a module's session manager (seed: ISessionManager).

    ``async with MyModule.connect(url) as manager: await manager.run_until(stop)``.
    """

    module_id: str = ""
    required: ClassVar[bool] = True
    capabilities: ClassVar[Sequence[str]] = ()

    def __init__(
        self,
        transport: Transport,
        *,
        module_id: str | None = None,
        topology: Topology | None = None,
        retry_attempts: int = 3,
        client_timeout: float = 10.0,
        heartbeat_interval: float = 5.0,
        prefetch: int = 128,
        concurrency: int = 64,
        own_transport: bool = False,
        register: bool = True,
    ) -> None:
        self.module_id = parse_module_id(module_id or type(self).module_id)
        self.transport = transport
        self.topology = topology or Topology()
        self.retry_attempts = retry_attempts
        self.heartbeat_interval = heartbeat_interval
        self.own_transport = own_transport
        self.register = register
        self.instance_id = new_id()
        self.client = CoordinatorClient(transport, self.topology, timeout=client_timeout)
        self.callbacks = SessionLifecycleCallbacks()
        self.sessions: dict[uuid.UUID, WorkflowSession] = {}
        self._destroyed: OrderedDict[uuid.UUID, int] = OrderedDict()
        self._owned: dict[uuid.UUID, uuid.UUID] = {}  # workflow session -> module session
        # A reaction cut short (a lost connection, the coordinator away) is tried again
        # when its event is redelivered. These remember a module session made whose link
        # is not confirmed yet, and one destroyed whose unlink is not, so that the retry
        # links or unlinks it instead of making or destroying another.
        self._made_unlinked: dict[uuid.UUID, tuple[uuid.UUID, dict[str, Any]]] = {}
        self._destroyed_linked: dict[uuid.UUID, uuid.UUID] = {}
        # Module sessions whose on_destroy ran: a later request for one (a redelivered
        # orphan clean-up, an unlink seen after the destroy) does not run it again.
        self._released: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._errors: deque[StandardError] = deque(maxlen=_ERROR_MEMORY)
        self._created_total = 0
        self._codec = Codec("json")
        self.consumer = EventConsumer(
            transport,
            self.topology,
            self.module_id,
            apply=self._apply,
            current_version=self._version,
            fill_gap=self._fill_gap,
            apply_history=self._apply_history,
            prefetch=prefetch,
            concurrency=concurrency,
        )
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._running = False
        self._closed = False

    # -- construction -----------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        url: str | Sequence[str] | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        **options: Any,
    ) -> Self:
        """A manager on its own RabbitMQ connection (closed with the manager). ``url``
        is one AMQP URL, or the nodes of a cluster (several URLs, or one string with
        them separated by commas): the connection moves to another node when its node
        goes. What is not given comes from ``settings`` (default: read from the
        environment now, ``Settings.from_env()``): the URL from ``SESSIONBUS_AMQP_URL``;
        the topology prefix is ``prefix``, else the ``topology`` option, else
        ``SESSIONBUS_PREFIX``, else the default."""
        module_id = options.get("module_id") or cls.module_id
        settings = connection_settings(settings, url, prefix)
        name = settings.connection_name or f"sessionbus-module-{module_id}"
        transport = AmqpTransport(settings.amqp_url, connection_name=name)
        topology: Topology | None = options.pop("topology", None)
        if prefix or topology is None:
            topology = settings.topology()
        return cls(transport, topology=topology, own_transport=True, **options)

    # -- hooks a module overrides -----------------------------------------------------

    async def on_create(
        self,
        session: WorkflowSession,
        module_session_id: uuid.UUID,
        config: ModuleSessionConfig,
    ) -> dict[str, Any] | None:
        """Create this module's own session for ``session``; return its metadata.
        Raising fails the attempt (retried up to ``retry_attempts``)."""
        return None

    async def on_destroy(self, info: ModuleSessionInfo) -> None:
        """Tear down this module's session ``info.session_id``."""

    def should_join(self, session: WorkflowSession) -> bool:
        """Whether to take part in a new workflow session (default: always)."""
        return True

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, declare the module queue, register, load the live sessions, consume,
        and reconcile: returns once every listed session has had its reaction."""
        if self.own_transport:
            await self.transport.connect()
        await self.transport.declare_queue(self.topology.module_queue_spec(self.module_id))
        if self.register:
            await self.client.register_module(
                self.module_id, required=self.required, capabilities=list(self.capabilities)
            )
        await self._catch_up()
        await self.consumer.start()
        self._running = True
        if self.heartbeat_interval > 0:
            self._heartbeat_task = asyncio.create_task(
                self._heartbeats(), name=f"heartbeat-{self.module_id}"
            )
        try:
            await self._reconcile(list(self.sessions))
        except BaseException:
            await self.close()
            raise

    async def close(self, grace: float = 10.0) -> None:
        """Stop consuming → finish running handlers (bounded) → requeue the prefetched
        → stop heartbeats → close the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        await self.consumer.stop(grace)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=grace)
        if self.own_transport:
            await self.transport.close()

    async def run_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (a signal handler sets it)."""
        await stop.wait()

    async def _catch_up(self) -> None:
        """Load every live session from the coordinator (no reaction yet). Queued
        events of sessions not listed, from before the listing, are history from then
        on."""
        snapshot = await self.client.snapshot_workflow_sessions()
        for session in snapshot.sessions:
            self.sessions[session.session_id] = session
            info = session.modules.get(self.module_id)
            if info is not None:
                self._owned[session.session_id] = info.session_id
        self.consumer.history_until = snapshot.position

    async def _reconcile(self, listed: Sequence[uuid.UUID]) -> None:
        """Create and link where this module is expected, finish clean-ups it missed —
        each as the session is *now*: consumption has started, so each reaction waits
        its turn behind the session's deliveries already being applied, and one that
        meanwhile ended (a destroy in the queue behind the listing) gets none."""
        for sid in listed:
            async with self.consumer.session_turn(sid):
                session = self.sessions.get(sid)
                if session is None:
                    continue
                if self._wants_create(session):
                    # A create is a side effect (a browser, a connection): ask whether
                    # the session still waits for one, not only the listing — it may
                    # have ended, or the link of a previous life landed, since.
                    now = await self.client.get_workflow_session(sid)
                    if now is None or now.destroyed or not self._wants_create(now):
                        continue
                await self._react_to_state(session)

    def _wants_create(self, session: WorkflowSession, *, new: bool = False) -> bool:
        """Whether ``session`` waits for this module's session. ``new``: this process
        never saw it before, so it may join one that went ACTIVE without it."""
        joinable = session.status is _S.INITIALIZING or (new and session.status in ACTIVE_STATUSES)
        return joinable and self.module_id not in session.modules and self.should_join(session)

    async def _react_to_state(self, session: WorkflowSession, *, new: bool = False) -> None:
        """Create or destroy as ``session``'s state asks (see ``_wants_create``)."""
        sid = session.session_id
        if session.status is _S.CLEANUP and self.module_id in session.modules:
            await self._safe(self.destroy_session(sid, reason="workflow session cleanup"), sid)
        elif self._wants_create(session, new=new):
            await self._safe(self.create_session(sid), sid)

    # -- ISessionManager: lifecycle ---------------------------------------------------

    async def create_session(
        self, workflow_session_id: uuid.UUID, config: ModuleSessionConfig | None = None
    ) -> str:
        """Create this module's session for a workflow session and link it. Returns the
        module session id (an existing link's id if already linked)."""
        session = self.sessions.get(workflow_session_id)
        if session is None:
            session = await self.client.get_workflow_session(workflow_session_id)
            if session is None:
                raise CommandFailed(
                    StandardError(
                        code=ErrorCode.UNKNOWN_SESSION,
                        message=f"no workflow session {workflow_session_id}",
                        module_id=self.module_id,
                    )
                )
        existing = session.modules.get(self.module_id)
        if existing is not None:
            return str(existing.session_id)
        config = (
            config or session.config.module_configs.get(self.module_id) or ModuleSessionConfig()
        )
        attempts = (
            config.retry_attempts if config.retry_attempts is not None else self.retry_attempts
        )
        made = self._made_unlinked.get(workflow_session_id)
        if made is not None:
            module_session_id, metadata = made
        else:
            module_session_id, metadata = await self._make(session, config, attempts)
            self._made_unlinked[workflow_session_id] = (module_session_id, metadata)
            self._created_total += 1
        self._owned[workflow_session_id] = module_session_id
        try:
            await self.client.link_module_session(
                workflow_session_id,
                self.module_id,
                module_session_id,
                config=config,
                metadata=metadata,
                command_id=_command_id(module_session_id, "link"),
            )
        except CommandFailed:
            # The workflow session moved on (cleanup, failure) before the link: what was
            # just created belongs to nobody, so it goes.
            self._made_unlinked.pop(workflow_session_id, None)
            self._owned.pop(workflow_session_id, None)
            await self._destroy_internal(workflow_session_id, module_session_id)
            raise
        self._made_unlinked.pop(workflow_session_id, None)
        return str(module_session_id)

    async def _make(
        self, session: WorkflowSession, config: ModuleSessionConfig, attempts: int
    ) -> tuple[uuid.UUID, dict[str, Any]]:
        """Run ``on_create`` (retried); a final failure is reported as a fatal error."""
        module_session_id = new_id()
        try:
            metadata = await self._retry(
                attempts, lambda: self.on_create(session, module_session_id, config)
            )
        except Exception as exc:
            error = StandardError(
                code=ErrorCode.MODULE_ERROR,
                message=f"{self.module_id} could not create its session after "
                f"{attempts + 1} attempts: {type(exc).__name__}: {exc}",
                module_id=self.module_id,
            )
            self._errors.append(error)
            await self.client.report_error(
                session.session_id, error, module_id=self.module_id, fatal=True
            )
            raise SdkError(error.message) from exc
        return module_session_id, dict(metadata or {})

    async def destroy_session(
        self, workflow_session_id: uuid.UUID, *, reason: str | None = None
    ) -> None:
        """Destroy this module's session of a workflow session and unlink it. If the
        module's hook fails, the link stays: the coordinator's cleanup timeout then
        records the session as orphaned rather than pretending it is gone."""
        module_session_id = self._owned.get(workflow_session_id)
        session = self.sessions.get(workflow_session_id)
        if module_session_id is None and session is not None:
            info = session.modules.get(self.module_id)
            module_session_id = info.session_id if info is not None else None
        if module_session_id is None:
            return
        if self._destroyed_linked.get(workflow_session_id) != module_session_id:
            await self._destroy_internal(workflow_session_id, module_session_id)
            self._destroyed_linked[workflow_session_id] = module_session_id
        self._owned.pop(workflow_session_id, None)
        await self.client.unlink_module_session(
            workflow_session_id,
            self.module_id,
            reason,
            command_id=_command_id(module_session_id, "unlink"),
        )
        self._destroyed_linked.pop(workflow_session_id, None)

    async def _destroy_internal(
        self, workflow_session_id: uuid.UUID, module_session_id: uuid.UUID
    ) -> None:
        if module_session_id in self._released:
            return
        info = self._info(workflow_session_id, module_session_id)
        try:
            await self._retry(self.retry_attempts, lambda: self.on_destroy(info))
        except Exception as exc:
            error = StandardError(
                code=ErrorCode.MODULE_ERROR,
                message=f"{self.module_id} could not destroy session {module_session_id}: {exc}",
                module_id=self.module_id,
            )
            self._errors.append(error)
            raise SdkError(error.message) from exc
        self._released[module_session_id] = None
        if len(self._released) > _RELEASED_MEMORY:
            self._released.popitem(last=False)

    def _info(
        self, workflow_session_id: uuid.UUID, module_session_id: uuid.UUID
    ) -> ModuleSessionInfo:
        session = self.sessions.get(workflow_session_id)
        if session is not None:
            info = session.modules.get(self.module_id)
            if info is not None and info.session_id == module_session_id:
                return info
        now = datetime.now(UTC)
        return ModuleSessionInfo(
            module_id=self.module_id,
            session_id=module_session_id,
            linked_workflow_session_id=workflow_session_id,
            status=_S.CLEANUP,
            created_at=now,
            last_activity=now,
        )

    # -- ISessionManager: reads (local, synchronous) ----------------------------------

    def get_session(self, workflow_session_id: uuid.UUID) -> ModuleSessionInfo | None:
        session = self.sessions.get(workflow_session_id)
        return session.modules.get(self.module_id) if session is not None else None

    def session_exists(self, workflow_session_id: uuid.UUID) -> bool:
        return self.get_session(workflow_session_id) is not None

    def get_session_status(self, workflow_session_id: uuid.UUID) -> SessionStatus | None:
        info = self.get_session(workflow_session_id)
        return info.status if info is not None else None

    def get_last_activity(self, workflow_session_id: uuid.UUID) -> datetime | None:
        info = self.get_session(workflow_session_id)
        return info.last_activity if info is not None else None

    # -- ISessionManager: writes (through the coordinator) ----------------------------

    async def update_session_status(
        self, workflow_session_id: uuid.UUID, status: SessionStatus
    ) -> None:
        await self.client.update_session_status(
            workflow_session_id, status, module_id=self.module_id
        )

    async def record_activity(self, workflow_session_id: uuid.UUID) -> None:
        await self.client.record_activity(workflow_session_id, self.module_id)

    @property
    def created_total(self) -> int:
        """How many module sessions this instance created."""
        return self._created_total

    def set_lifecycle_callbacks(self, callbacks: SessionLifecycleCallbacks) -> None:
        self.callbacks = callbacks

    async def health_check(self) -> SessionManagerHealth:
        active = sum(
            1
            for sid in self._owned
            if (s := self.sessions.get(sid)) is not None and s.status in ACTIVE_STATUSES
        )
        return SessionManagerHealth(
            module_id=self.module_id,
            is_healthy=self._running,
            active_sessions=active,
            total_sessions=self._created_total,
            errors=list(self._errors),
            last_health_check=datetime.now(UTC),
        )

    # -- applying events --------------------------------------------------------------

    def _version(self, session_id: uuid.UUID) -> int:
        session = self.sessions.get(session_id)
        if session is not None:
            return session.version
        return self._destroyed.get(session_id, 0)

    async def _fill_gap(
        self, session_id: uuid.UUID, after: int, before: int
    ) -> list[EventEnvelope]:
        """The session's events after ``after``: the gap before the arriving version
        and whatever the coordinator has past it, to be folded at once."""
        history = await self.client.get_session_history(session_id)
        return [e for e in history.events if e.version > after]

    async def _apply(self, env: EventEnvelope) -> None:
        """Apply one event as news: fold it, react to the event."""
        if env.session_id == REGISTRY_ID:
            await self._apply_registry(env)
            return
        before = self.sessions.get(env.session_id)
        state = fold_session(before, env)
        await self._settle(before, state, self._react(env, before, state))

    async def _apply_history(self, events: Sequence[EventEnvelope]) -> None:
        """Apply a session's consecutive events as history: fold them all, then react
        once to the state they lead to."""
        before = self.sessions.get(events[0].session_id)
        state = before
        for env in events:
            state = fold_session(state, env)
        assert state is not None
        await self._settle(before, state, self._react_to_history(events, before, state))

    async def _settle(
        self, before: WorkflowSession | None, state: WorkflowSession, reaction: Awaitable[None]
    ) -> None:
        """Keep ``state`` as the session's, then run the reaction to it."""
        sid = state.session_id
        if state.destroyed:
            self.sessions.pop(sid, None)
            self._destroyed[sid] = state.version
            if len(self._destroyed) > _DESTROYED_MEMORY:
                self._destroyed.popitem(last=False)
        else:
            self.sessions[sid] = state
        try:
            await reaction
        except BaseException:
            # Not applied (the reaction failed, or was cancelled: a lost connection, a
            # close): put the local state back, or the redelivery would be taken for a
            # duplicate and the reaction (link, unlink, callbacks) never run.
            self._destroyed.pop(sid, None)
            if before is None:
                self.sessions.pop(sid, None)
            else:
                self.sessions[sid] = before
            raise

    async def _react_to_history(
        self,
        events: Sequence[EventEnvelope],
        before: WorkflowSession | None,
        state: WorkflowSession,
    ) -> None:
        """React once to where a run of past events left a session, never to each."""
        sid = state.session_id
        cb = self.callbacks
        previous = before.modules.get(self.module_id) if before is not None else None
        if state.destroyed:
            # Release what this process still holds for it (a module session made and
            # never linked, or linked and never unlinked), once; nothing new is made.
            held = {self._owned.pop(sid, None), self._made_unlinked.pop(sid, (None,))[0]}
            self._destroyed_linked.pop(sid, None)
            for module_session_id in held - {None}:
                assert module_session_id is not None
                await self._safe(self._destroy_internal(sid, module_session_id), sid)
            if before is not None or held - {None}:
                await self._callback(cb.on_session_destroyed(self.module_id, sid))
            return
        mine = state.modules.get(self.module_id)
        owned = self._owned.get(sid)
        if mine is not None:
            self._owned[sid] = mine.session_id
            made = self._made_unlinked.get(sid)
            if made is not None and made[0] == mine.session_id:
                del self._made_unlinked[sid]  # its link is confirmed after all
            if previous is None or previous.session_id != mine.session_id:
                await self._callback(cb.on_session_created(self.module_id, sid, mine.session_id))
        elif previous is not None and owned == previous.session_id:
            # Unlinked by someone else (integrity repair): release what we hold.
            self._owned.pop(sid, None)
            await self._safe(self._destroy_internal(sid, previous.session_id), sid)
        old = before.status if before is not None else _S.INITIALIZING
        if state.status is not old:
            await self._callback(
                cb.on_session_status_changed(self.module_id, sid, old, state.status)
            )
        for env in events:
            if isinstance(env.event, ErrorReported):
                await self._callback(
                    cb.on_session_error(env.event.module_id or self.module_id, sid, env.event.error)
                )
        await self._react_to_state(state, new=before is None)

    async def _react(
        self, env: EventEnvelope, before: WorkflowSession | None, state: WorkflowSession
    ) -> None:
        event = env.event
        sid = env.session_id
        cb = self.callbacks
        if isinstance(event, SessionCreated):
            if self.should_join(state):
                await self._safe(self.create_session(sid), sid)
        elif isinstance(event, Linked):
            if event.module_id == self.module_id:
                self._owned[sid] = event.module_session_id
                made = self._made_unlinked.get(sid)
                if made is not None and made[0] == event.module_session_id:
                    del self._made_unlinked[sid]  # its link is confirmed after all
                await self._callback(
                    cb.on_session_created(self.module_id, sid, event.module_session_id)
                )
        elif isinstance(event, StatusChanged):
            if event.module_id is None or event.module_id == self.module_id:
                await self._callback(
                    cb.on_session_status_changed(
                        self.module_id, sid, event.old_status, event.new_status
                    )
                )
            if (
                event.module_id is None
                and event.new_status is _S.CLEANUP
                and self.module_id in state.modules
            ):
                await self._safe(self.destroy_session(sid, reason="workflow session cleanup"), sid)
        elif isinstance(event, Unlinked):
            if (
                event.module_id == self.module_id
                and self._owned.get(sid) == event.module_session_id
            ):
                # Unlinked by someone else (integrity repair): release what we hold.
                self._owned.pop(sid, None)
                await self._safe(self._destroy_internal(sid, event.module_session_id), sid)
        elif isinstance(event, ErrorReported):
            await self._callback(
                cb.on_session_error(event.module_id or self.module_id, sid, event.error)
            )
        elif isinstance(event, Destroyed):
            orphaned = event.orphaned.get(self.module_id)
            if orphaned is not None and self._owned.get(sid) == orphaned:
                self._owned.pop(sid, None)
                await self._safe(self._destroy_internal(sid, orphaned), sid)
            self._destroyed_linked.pop(sid, None)
            made = self._made_unlinked.pop(sid, None)
            if made is not None:  # made, never linked, and now it never will be
                self._owned.pop(sid, None)
                await self._safe(self._destroy_internal(sid, made[0]), sid)
            await self._callback(cb.on_session_destroyed(self.module_id, sid))

    async def _apply_registry(self, env: EventEnvelope) -> None:
        event = env.event
        if isinstance(event, OrphanCleanupRequested) and event.module_id == self.module_id:
            self._owned.pop(event.workflow_session_id, None)
            await self._safe(
                self._destroy_internal(event.workflow_session_id, event.module_session_id),
                event.workflow_session_id,
            )

    # -- plumbing ---------------------------------------------------------------------

    async def _retry(self, attempts: int, call: Callable[[], Awaitable[Any]]) -> Any:
        async for attempt in retrying(max(1, attempts + 1), max_pause=2.0):
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _safe(self, awaitable: Awaitable[Any], session_id: uuid.UUID) -> None:
        """Run a reaction whose failure is already reported (or is the coordinator's
        refusal, e.g. a session that moved on): log it, do not stop the consumer."""
        try:
            await awaitable
        except CoordinatorUnavailable:
            raise  # not done, not refused: the event is requeued and tried again
        except (SdkError, TransportError) as exc:
            log.warning("%s: session %s: %s", self.module_id, session_id, exc)

    async def _callback(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("%s: lifecycle callback failed", self.module_id)

    async def _heartbeats(self) -> None:
        interval_ms = max(1, int(self.heartbeat_interval * 1000))
        while True:
            try:
                heartbeat = Heartbeat(
                    module_id=self.module_id,
                    instance_id=self.instance_id,
                    sent_at=datetime.now(UTC),
                    interval_ms=interval_ms,
                    health=await self.health_check(),
                )
                await self.transport.publish(
                    self.topology.heartbeats_exchange,
                    "",
                    OutgoingMessage(
                        body=self._codec.encode(heartbeat),
                        content_type=self._codec.content_type,
                        user_id=self.transport.user,
                        persistent=False,
                        expiration_ms=interval_ms * 3,
                    ),
                    mandatory=False,
                )
            except TransportError as exc:
                log.debug("%s: heartbeat not sent: %s", self.module_id, exc)
            await asyncio.sleep(self.heartbeat_interval)
