"""Aggregates: workflow sessions and the module registry, on the eventsourcing library.

Each aggregate's events carry a contracts ``EventEnvelope``: the Struct that is stored,
published and replayed is the one defined in ``contracts``, not a parallel class. State
is the result of ``contracts.fold``; command methods check every rule first and only
then trigger events, so a rejected command leaves the aggregate untouched.
"""

from __future__ import annotations

import functools
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final

import msgspec
from eventsourcing.domain import Aggregate, CanMutateAggregate
from eventsourcing.utils import get_topic

from contracts import (
    ACTIVE_STATUSES,
    GENESIS_HASH,
    REGISTRY_ID,
    SCHEMA_VERSION,
    TRANSITIONS,
    Destroyed,
    ErrorCode,
    ErrorReported,
    EventEnvelope,
    Linked,
    ModuleRegistered,
    ModuleSessionConfig,
    ModuleSessionInfo,
    ModuleUnregistered,
    OrphanCleanupRequested,
    OrphanReported,
    SessionCreated,
    SessionStatus,
    StandardError,
    StatusChanged,
    Unlinked,
    WorkflowConfig,
    WorkflowSession,
    fold_session,
    new_id,
    seal,
)
from contracts.events import ActivityRecorded, EventBase
from coordinator.domain.compact import pack, unpack
from coordinator.errors import CommandRejected

__all__ = [
    "COORDINATOR",
    "OPERATOR",
    "CommandContext",
    "EnvelopeSnapshot",
    "Mark",
    "ModuleRegistry",
    "Principal",
    "RegistryState",
    "UnpackedStates",
    "WorkflowSessionAggregate",
    "next_deadline",
    "require_module",
]

_S = SessionStatus


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sends a command. ``modules`` is the set of module ids it may act for;
    ``None`` means any (the coordinator itself, an operator, development mode)."""

    name: str
    modules: frozenset[str] | None = None

    def may_act_for(self, module_id: str) -> bool:
        return self.modules is None or module_id in self.modules

    @property
    def read_only(self) -> bool:
        """May act for no module at all (``user=`` in the identity map: an auditor):
        such a principal may read, and change nothing."""
        return self.modules is not None and not self.modules


COORDINATOR: Final = Principal("coordinator")
OPERATOR: Final = Principal("operator")


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What every event of one command shares: who, when, and why."""

    principal: Principal
    now: datetime
    command_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None

    def as_coordinator(self) -> CommandContext:
        """The same moment and cause, acted by the coordinator itself."""
        return CommandContext(COORDINATOR, self.now, self.command_id, self.correlation_id)


def require_module(ctx: CommandContext, module_id: str) -> None:
    if not ctx.principal.may_act_for(module_id):
        raise CommandRejected(
            ErrorCode.FORBIDDEN,
            f"{ctx.principal.name!r} may not act for module {module_id!r}",
            module_id=module_id,
            field="module_id",
        )


class EnvelopeAggregate(Aggregate):
    """An aggregate whose events each carry a sealed ``EventEnvelope``, chained by hash.

    Unsaved events are handed out by ``collect_events`` only, the library's way: a
    command that fails half way is undone by ``mark`` and ``rollback`` (see there)
    without editing the library's list of pending events."""

    class Event(Aggregate.Event):
        envelope: EventEnvelope

        def apply(self, aggregate: Any) -> None:
            aggregate.on_envelope(self.envelope)

    class Created(Event, Aggregate.Created):
        pass

    def __init__(self) -> None:
        self.last_hash = GENESIS_HASH
        # Unsaved events of the commands before the last ``mark``, collected from the
        # library's pending list so that a rollback collects (and drops) only the
        # events triggered since. A tuple: empty, it is the shared empty tuple.
        self._held: tuple[CanMutateAggregate[uuid.UUID], ...] = ()

    def on_envelope(self, env: EventEnvelope) -> None:
        """Evolve state by one event (subclasses fold their state, then chain)."""
        self.last_hash = env.hash

    @staticmethod
    def _envelope(
        stream_id: uuid.UUID, version: int, prev_hash: str, payload: EventBase, ctx: CommandContext
    ) -> EventEnvelope:
        return seal(
            EventEnvelope(
                event_id=new_id(),
                session_id=stream_id,
                version=version,
                occurred_at=ctx.now,
                actor=ctx.principal.name,
                prev_hash=prev_hash,
                hash=GENESIS_HASH,
                event=payload,  # type: ignore[arg-type]
                schema_version=SCHEMA_VERSION,
                correlation_id=ctx.correlation_id,
                causation_id=ctx.command_id,
            )
        )

    def _emit(self, payload: EventBase, ctx: CommandContext) -> None:
        env = self._envelope(self.id, self.version + 1, self.last_hash, payload, ctx)
        self.trigger_event(self.Event, envelope=env, timestamp=ctx.now)

    @classmethod
    def _start(cls, stream_id: uuid.UUID, payload: EventBase, ctx: CommandContext) -> Any:
        env = cls._envelope(stream_id, 1, GENESIS_HASH, payload, ctx)
        return cls._create(cls.Created, id=stream_id, envelope=env, timestamp=ctx.now)

    @property
    def unsaved(self) -> int:
        """How many events were triggered and not yet collected for saving."""
        return len(self._held) + len(self.pending_events)

    def pending_envelopes(self) -> list[EventEnvelope]:
        """Envelopes triggered but not yet saved."""
        return [e.envelope for e in (*self._held, *self.pending_events)]  # type: ignore[attr-defined]

    def collect_events(self) -> list[CanMutateAggregate[uuid.UUID]]:
        """Every unsaved event, in order, handed over for saving (what the library's
        ``Application.save`` asks an aggregate for)."""
        held, self._held = self._held, ()
        return [*held, *super().collect_events()]

    def mark(self) -> Mark:
        """Remember the current state, to undo a command that fails half way. The
        events triggered so far are held apart from the library's pending list, which
        then holds only what the command triggers."""
        if self.pending_events:  # mostly empty: the command is the first in its pass
            self._held = (*self._held, *super().collect_events())
        return Mark(
            self.version,
            self.modified_on,
            self.last_hash,
            getattr(self, "state", None),
            len(self._held),
        )

    def rollback(self, mark: Mark) -> None:
        """Undo everything triggered since ``mark``. State objects are immutable, so
        restoring the references restores the state."""
        self.version = mark.version
        self.modified_on = mark.modified_on
        self.last_hash = mark.last_hash
        if mark.state is not None:
            self.state = mark.state
        if self.pending_events:
            super().collect_events()  # what the command triggered: dropped
        if len(self._held) > mark.pending:
            self._held = self._held[: mark.pending]

    def discard_pending(self) -> None:
        """Forget unsaved events (after a failed save the aggregate is reloaded)."""
        self.collect_events()


@dataclass(frozen=True, slots=True)
class Mark:
    """A point to roll an aggregate back to."""

    version: int
    modified_on: datetime
    last_hash: str
    state: Any
    pending: int


# --- the module registry -------------------------------------------------------------


class RegistryState(msgspec.Struct, kw_only=True):
    """Registered modules, and orphaned module sessions reported and not yet cleared
    (keyed by module session id)."""

    modules: dict[str, ModuleRegistered] = msgspec.field(default_factory=dict)
    orphans: dict[uuid.UUID, OrphanReported] = msgspec.field(default_factory=dict)


class ModuleRegistry(EnvelopeAggregate):
    """The seed's registerModule / unregisterModule, as one event-sourced stream."""

    ID: ClassVar[uuid.UUID] = REGISTRY_ID

    def __init__(self) -> None:
        super().__init__()
        self.state = RegistryState()

    @classmethod
    def empty(cls) -> ModuleRegistry:
        """An unsaved registry at version 0 (no stream yet)."""
        registry = cls.__new__(cls)
        registry.__base_init__(originator_id=cls.ID, originator_version=0, timestamp=_EPOCH)
        registry.__init__()  # type: ignore[misc]
        return registry

    def on_envelope(self, env: EventEnvelope) -> None:
        # Copy on write, so a saved mark can roll the state back (registry changes are
        # rare; the copies cost nothing that matters).
        event = env.event
        modules, orphans = self.state.modules, self.state.orphans
        if isinstance(event, ModuleRegistered):
            modules = {**modules, event.module_id: event}
        elif isinstance(event, ModuleUnregistered):
            modules = {k: v for k, v in modules.items() if k != event.module_id}
        elif isinstance(event, OrphanReported):
            orphans = {**orphans, event.module_session_id: event}
        elif isinstance(event, OrphanCleanupRequested):
            orphans = {k: v for k, v in orphans.items() if k != event.module_session_id}
        self.state = RegistryState(modules=modules, orphans=orphans)
        super().on_envelope(env)

    def is_registered(self, module_id: str) -> bool:
        return module_id in self.state.modules

    def required_modules(self) -> list[str]:
        return sorted(m for m, reg in self.state.modules.items() if reg.required)

    def register(
        self, ctx: CommandContext, module_id: str, required: bool, capabilities: list[str]
    ) -> None:
        require_module(ctx, module_id)
        current = self.state.modules.get(module_id)
        if (
            current is not None
            and current.required == required
            and current.capabilities == capabilities
        ):
            return  # same registration again: a no-op
        self._emit(
            ModuleRegistered(module_id=module_id, required=required, capabilities=capabilities),
            ctx,
        )

    def unregister(self, ctx: CommandContext, module_id: str, reason: str | None) -> None:
        require_module(ctx, module_id)
        if module_id in self.state.modules:
            self._emit(ModuleUnregistered(module_id=module_id, reason=reason), ctx)

    def report_orphan(
        self,
        ctx: CommandContext,
        module_id: str,
        workflow_session_id: uuid.UUID,
        module_session_id: uuid.UUID,
    ) -> None:
        require_module(ctx, module_id)
        if module_session_id in self.state.orphans:
            return
        self._emit(
            OrphanReported(
                module_id=module_id,
                workflow_session_id=workflow_session_id,
                module_session_id=module_session_id,
            ),
            ctx,
        )

    def request_orphan_cleanup(self, ctx: CommandContext, orphan: OrphanReported) -> None:
        self._emit(
            OrphanCleanupRequested(
                module_id=orphan.module_id,
                workflow_session_id=orphan.workflow_session_id,
                module_session_id=orphan.module_session_id,
            ),
            ctx,
        )

    def orphans_of(self, workflow_session_id: uuid.UUID) -> list[OrphanReported]:
        return [
            o for o in self.state.orphans.values() if o.workflow_session_id == workflow_session_id
        ]


# --- workflow sessions ---------------------------------------------------------------

_EPOCH: Final = datetime(1970, 1, 1).astimezone()
_LIVE: Final = ACTIVE_STATUSES  # INITIALIZING, ACTIVE, PAUSED


@functools.lru_cache(maxsize=1024)
def _ms(value: int) -> timedelta:
    # Cached: a handful of distinct timeouts, and next_deadline runs for every session
    # a commit touches and every session the projections pack.
    return timedelta(milliseconds=value)


class WorkflowSessionAggregate(EnvelopeAggregate):
    """The seed's WorkflowSession: its status, its linked module sessions, its rules.

    ``state`` is kept in the instance ``__dict__``, behind the property of that name;
    ``compact`` replaces it there by its packed form
    (``coordinator.domain.compact``), which the next read of ``state`` unpacks: an aggregate
    the writer keeps cached between commands holds ~0.5 KB instead of ~6 KB."""

    @property
    def state(self) -> WorkflowSession:
        attrs = self.__dict__
        state: WorkflowSession | None = attrs.get("state")
        if state is None:
            packed = attrs.get("_packed")
            if packed is None:
                raise AttributeError("state")
            # ``_packed`` stays until the state changes: compacting again is free.
            state = attrs["state"] = unpack(self.id, packed)
        return state

    @state.setter
    def state(self, value: WorkflowSession) -> None:
        attrs = self.__dict__
        attrs["state"] = value
        attrs.pop("_packed", None)

    def compact(self) -> None:
        """Hold the state packed until it is next read (a no-op when it is packed, or
        when it cannot be packed exactly)."""
        attrs = self.__dict__
        state = attrs.get("state")
        if state is None:
            return
        if "_packed" not in attrs:  # changed since it was last unpacked
            packed = pack(state)
            if packed is None:
                return
            attrs["_packed"] = packed
        del attrs["state"]

    def on_envelope(self, env: EventEnvelope) -> None:
        self.state = fold_session(getattr(self, "state", None), env)
        super().on_envelope(env)

    # -- creation ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        ctx: CommandContext,
        session_id: uuid.UUID,
        steps: list[str],
        config: WorkflowConfig,
        registry: ModuleRegistry,
    ) -> WorkflowSessionAggregate:
        """A new session, INITIALIZING; ACTIVE at once when nothing is required."""
        if config.required_modules is None:
            required = registry.required_modules()
        else:
            unknown = [m for m in config.required_modules if not registry.is_registered(m)]
            if unknown:
                raise CommandRejected(
                    ErrorCode.MODULE_NOT_REGISTERED,
                    f"required modules are not registered: {', '.join(unknown)}",
                    field="config.required_modules",
                )
            required = sorted(set(config.required_modules))
        session: WorkflowSessionAggregate = cls._start(
            session_id,
            SessionCreated(steps=steps, config=config, required_modules=required),
            ctx,
        )
        session._settle(ctx)
        return session

    # -- checks -----------------------------------------------------------------------

    def _check_open(self, *, allow_cleanup: bool = False) -> None:
        if self.state.destroyed:
            raise CommandRejected(
                ErrorCode.SESSION_DESTROYED, f"session {self.id} is destroyed", field="session_id"
            )
        if self.state.status is _S.CLEANUP and not allow_cleanup:
            raise CommandRejected(
                ErrorCode.SESSION_CLOSED,
                f"session {self.id} is being cleaned up",
                field="session_id",
            )

    def _linked(self, module_id: str) -> ModuleSessionInfo:
        info = self.state.modules.get(module_id)
        if info is None:
            raise CommandRejected(
                ErrorCode.MODULE_NOT_LINKED,
                f"module {module_id!r} has no session linked to {self.id}",
                module_id=module_id,
                field="module_id",
            )
        return info

    @staticmethod
    def _check_transition(old: SessionStatus, new: SessionStatus, what: str) -> None:
        if new not in TRANSITIONS[old]:
            raise CommandRejected(
                ErrorCode.INVALID_TRANSITION,
                f"{what} cannot go from {old} to {new}",
                field="status",
                old_status=old,
                new_status=new,
            )

    # -- commands ---------------------------------------------------------------------

    def link(
        self,
        ctx: CommandContext,
        module_id: str,
        module_session_id: uuid.UUID,
        config: ModuleSessionConfig,
        metadata: dict[str, Any],
        registry: ModuleRegistry,
    ) -> None:
        """Seed rule 4: a module session is linked to an existing workflow session."""
        require_module(ctx, module_id)
        self._check_open()
        if self.state.status not in _LIVE:
            raise CommandRejected(
                ErrorCode.SESSION_CLOSED,
                f"session {self.id} is {self.state.status}; modules can no longer link",
                module_id=module_id,
            )
        if not registry.is_registered(module_id):
            raise CommandRejected(
                ErrorCode.MODULE_NOT_REGISTERED,
                f"module {module_id!r} is not registered",
                module_id=module_id,
                field="module_id",
            )
        current = self.state.modules.get(module_id)
        if current is not None:
            if current.session_id == module_session_id:
                return  # the same link again: a no-op
            raise CommandRejected(
                ErrorCode.MODULE_ALREADY_LINKED,
                f"module {module_id!r} already linked session {current.session_id} to {self.id}",
                module_id=module_id,
                field="module_session_id",
            )
        if config == ModuleSessionConfig():
            config = self.state.config.module_configs.get(module_id, config)
        self._emit(
            Linked(
                module_id=module_id,
                module_session_id=module_session_id,
                config=config,
                metadata=metadata,
            ),
            ctx,
        )
        self._settle(ctx)

    def unlink(self, ctx: CommandContext, module_id: str, reason: str | None) -> None:
        """Unlink a module session; unlinking what is not linked is a no-op."""
        require_module(ctx, module_id)
        self._check_open(allow_cleanup=True)
        info = self.state.modules.get(module_id)
        if info is None:
            return
        self._emit(
            Unlinked(module_id=module_id, module_session_id=info.session_id, reason=reason), ctx
        )
        self._settle(ctx)

    def set_status(self, ctx: CommandContext, status: SessionStatus, reason: str | None) -> None:
        """Seed rule 3: the workflow session's status changes only by the table."""
        self._check_open(allow_cleanup=status is _S.CLEANUP)
        old = self.state.status
        if status is old:
            return
        self._check_transition(old, status, f"session {self.id}")
        self._emit(StatusChanged(old_status=old, new_status=status, reason=reason), ctx)
        self._settle(ctx)

    def set_module_status(
        self, ctx: CommandContext, module_id: str, status: SessionStatus, reason: str | None
    ) -> None:
        """A module updates its own session's status (same table)."""
        require_module(ctx, module_id)
        self._check_open(allow_cleanup=True)
        info = self._linked(module_id)
        if status is info.status:
            return
        self._check_transition(info.status, status, f"module session {info.session_id}")
        self._emit(
            StatusChanged(
                old_status=info.status, new_status=status, module_id=module_id, reason=reason
            ),
            ctx,
        )
        if status is _S.FAILED and self._is_required(module_id) and self.state.status in _LIVE:
            self.fail(
                ctx.as_coordinator(),
                ErrorCode.MODULE_ERROR,
                f"required module {module_id!r} failed its session"
                + (f": {reason}" if reason else ""),
                module_id=module_id,
            )
        self._settle(ctx)

    def record_activity(self, ctx: CommandContext, module_id: str | None) -> None:
        """Reset the inactivity timeout of the session or of one module's session."""
        if module_id is not None:
            require_module(ctx, module_id)
        self._check_open(allow_cleanup=True)
        if module_id is not None:
            self._linked(module_id)
        self._emit(ActivityRecorded(module_id=module_id), ctx)

    def report_error(
        self, ctx: CommandContext, module_id: str | None, error: StandardError, fatal: bool
    ) -> None:
        """Record an error; a fatal one from a required module fails the session."""
        if module_id is not None:
            require_module(ctx, module_id)
        self._check_open(allow_cleanup=True)
        self._emit(ErrorReported(error=error, module_id=module_id), ctx)
        if (
            fatal
            and module_id is not None
            and self._is_required(module_id)
            and self.state.status in _LIVE
        ):
            self.fail(
                ctx.as_coordinator(),
                ErrorCode.MODULE_ERROR,
                f"required module {module_id!r} reported {error.code}: {error.message}",
                module_id=module_id,
            )

    def destroy(self, ctx: CommandContext, reason: str | None) -> None:
        """Seed: destroyWorkflowSession. Goes through CLEANUP; destroyed once every
        linked module has unlinked. Destroying a destroyed session is a no-op."""
        if self.state.destroyed:
            return
        if self.state.status is not _S.CLEANUP:
            self._emit(
                StatusChanged(old_status=self.state.status, new_status=_S.CLEANUP, reason=reason),
                ctx,
            )
        self._settle(ctx)

    # -- what the coordinator decides itself ------------------------------------------

    def _is_required(self, module_id: str) -> bool:
        return module_id in self.state.required_modules

    def _missing(self) -> list[str]:
        return [m for m in self.state.required_modules if m not in self.state.modules]

    def fail(
        self,
        ctx: CommandContext,
        code: ErrorCode,
        reason: str,
        *,
        module_id: str | None = None,
    ) -> None:
        """FAILED with the reason recorded, then CLEANUP of what did link. Used by the
        coordinator's own decisions (timeouts, module errors, integrity repair)."""
        old = self.state.status
        error = StandardError(code=code, message=reason, module_id=module_id)
        self._emit(
            StatusChanged(old_status=old, new_status=_S.FAILED, reason=reason, error=error), ctx
        )
        self._emit(
            StatusChanged(
                old_status=_S.FAILED, new_status=_S.CLEANUP, reason="cleanup after failure"
            ),
            ctx,
        )
        self._settle(ctx)

    def _settle(self, ctx: CommandContext) -> None:
        """Follow-up transitions that the rules make automatic."""
        state = self.state
        if state.destroyed:
            return
        coordinator = ctx.as_coordinator()
        if state.status is _S.INITIALIZING and not self._missing():
            self._emit(
                StatusChanged(
                    old_status=_S.INITIALIZING,
                    new_status=_S.ACTIVE,
                    reason="every required module linked",
                ),
                coordinator,
            )
        elif state.status is _S.CLEANUP and not state.modules:
            self._emit(Destroyed(reason="cleanup complete"), coordinator)

    def next_deadline(self) -> datetime | None:
        """The earliest time a timeout could fire, or ``None``."""
        return next_deadline(self.state)

    def _status_since(self) -> datetime:
        return _status_since(self.state)

    def run_timeouts(self, ctx: CommandContext) -> None:
        """Emit whatever transitions are due at ``ctx.now``. PAUSED sessions are
        exempt from inactivity timeouts: pausing is the way to be idle on purpose."""
        state = self.state
        now = ctx.now
        if state.destroyed:
            return
        config = state.config
        if state.status is _S.CLEANUP:
            if now >= self._status_since() + _ms(config.cleanup_timeout_ms):
                orphaned = {m: info.session_id for m, info in state.modules.items()}
                self._emit(
                    Destroyed(
                        reason=f"cleanup timeout: {', '.join(sorted(orphaned))} did not unlink "
                        f"within {config.cleanup_timeout_ms} ms",
                        orphaned=orphaned,
                    ),
                    ctx,
                )
            return
        missing = self._missing()
        link_deadline = state.created_at + _ms(config.link_timeout_ms)
        if state.status is _S.INITIALIZING and missing and now >= link_deadline:
            self.fail(
                ctx,
                ErrorCode.LINK_TIMEOUT,
                f"required modules did not link within {config.link_timeout_ms} ms: "
                + ", ".join(missing),
            )
            return
        if state.status not in (_S.INITIALIZING, _S.ACTIVE):
            return
        if config.timeout_ms and now >= state.last_activity + _ms(config.timeout_ms):
            self.fail(
                ctx,
                ErrorCode.INACTIVITY_TIMEOUT,
                f"no activity for {config.timeout_ms} ms",
            )
            return
        for module_id, info in sorted(state.modules.items()):
            timeout = info.config.timeout_ms
            if (
                timeout
                and info.status in (_S.INITIALIZING, _S.ACTIVE)
                and now >= info.last_activity + _ms(timeout)
            ):
                reason = f"module {module_id!r} had no activity for {timeout} ms"
                self._emit(
                    StatusChanged(
                        old_status=info.status,
                        new_status=_S.FAILED,
                        module_id=module_id,
                        reason=reason,
                        error=StandardError(
                            code=ErrorCode.INACTIVITY_TIMEOUT, message=reason, module_id=module_id
                        ),
                    ),
                    ctx,
                )
                if self._is_required(module_id) and self.state.status in _LIVE:
                    self.fail(ctx, ErrorCode.INACTIVITY_TIMEOUT, reason, module_id=module_id)
                    return


class EnvelopeSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A session's or the registry's state at one version, for the application's
    snapshot store (``EventStore`` takes one every ``snapshot_interval`` events).

    Taken from the aggregate's public attributes and turned back into an aggregate by
    the library's documented initialisers (``__base_init__``, then ``__init__``), so it
    relies on no attribute layout of eventsourcing's ``Aggregate``. The repository
    reads it as a domain event: an ``originator_id``, an ``originator_version`` and a
    ``mutate`` that builds the aggregate."""

    originator_id: uuid.UUID
    originator_version: int
    timestamp: datetime
    topic: str  # the aggregate class's, as eventsourcing names it (kept in the row)
    created_on: datetime
    modified_on: datetime
    last_hash: str
    state: WorkflowSession | RegistryState

    @classmethod
    def take(
        cls, aggregate: WorkflowSessionAggregate | ModuleRegistry, now: datetime
    ) -> EnvelopeSnapshot:
        return cls(
            originator_id=aggregate.id,
            originator_version=aggregate.version,
            timestamp=now,
            topic=get_topic(type(aggregate)),
            created_on=aggregate.created_on,
            modified_on=aggregate.modified_on,
            last_hash=aggregate.last_hash,
            state=aggregate.state,  # a packed session state is unpacked here
        )

    def mutate(self, _: object) -> WorkflowSessionAggregate | ModuleRegistry:
        """The aggregate at this version. Its class follows from the kind of state
        (not from ``topic``, which names a module path that may have moved since)."""
        aggregate: WorkflowSessionAggregate | ModuleRegistry
        if isinstance(self.state, RegistryState):
            aggregate = ModuleRegistry.__new__(ModuleRegistry)
        else:
            aggregate = WorkflowSessionAggregate.__new__(WorkflowSessionAggregate)
        aggregate.__base_init__(
            originator_id=self.originator_id,
            originator_version=self.originator_version,
            timestamp=self.created_on,
        )
        aggregate.__init__()  # type: ignore[misc]
        aggregate.modified_on = self.modified_on
        aggregate.last_hash = self.last_hash
        aggregate.state = self.state
        return aggregate


class UnpackedStates:
    """Which cached session aggregates keep their state unpacked: the ``size`` most
    recently used. The writer tells it each aggregate it uses; the one that falls out
    is compacted (it unpacks again when next used)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._recent: OrderedDict[uuid.UUID, WorkflowSessionAggregate] = OrderedDict()

    def used(self, aggregate: WorkflowSessionAggregate) -> None:
        recent = self._recent
        recent[aggregate.id] = aggregate
        recent.move_to_end(aggregate.id)
        while len(recent) > self.size:
            recent.popitem(last=False)[1].compact()


def _status_since(state: WorkflowSession) -> datetime:
    return state.status_changed_at or state.created_at


def next_deadline(state: WorkflowSession) -> datetime | None:
    """The earliest time a timeout of this session could fire, or ``None``: a pure
    function of the state, so a restarted coordinator re-arms every timer from its
    projections."""
    if state.destroyed:
        return None
    config = state.config
    candidates: list[datetime] = []
    if state.status is _S.CLEANUP:
        candidates.append(_status_since(state) + _ms(config.cleanup_timeout_ms))
    if state.status is _S.INITIALIZING and any(
        m not in state.modules for m in state.required_modules
    ):
        candidates.append(state.created_at + _ms(config.link_timeout_ms))
    if state.status in (_S.INITIALIZING, _S.ACTIVE):
        if config.timeout_ms:
            candidates.append(state.last_activity + _ms(config.timeout_ms))
        candidates.extend(
            info.last_activity + _ms(info.config.timeout_ms)
            for info in state.modules.values()
            if info.status in (_S.INITIALIZING, _S.ACTIVE) and info.config.timeout_ms
        )
    return min(candidates, default=None)
