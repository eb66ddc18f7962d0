"""A stateful property test: random command sequences against a SessionCoordinator
(memory store) and against a plain model of the rules written here from the seed and
DESIGN.md, compared after every step; every session's hash chain verified at the end.

The model is deliberately independent of ``coordinator``: the transition table is
written out again, and each rule is a few lines of ordinary Python.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from contracts import (
    REGISTRY_ID,
    Accepted,
    Command,
    CreateWorkflowSession,
    DestroyWorkflowSession,
    ErrorCode,
    LinkModuleSession,
    RecordActivity,
    ReportError,
    SessionStatus,
    StandardError,
    UnlinkModuleSession,
    UpdateSessionStatus,
    WorkflowConfig,
)
from coordinator.domain.aggregates import Principal
from coordinator.domain.clock import ManualClock
from coordinator.errors import CommandRejected
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore

S = SessionStatus
LIVE = {S.INITIALIZING, S.ACTIVE, S.PAUSED}

# DESIGN.md, "Transitions", written out again (not imported from contracts).
TABLE: dict[SessionStatus, set[SessionStatus]] = {
    S.INITIALIZING: {S.ACTIVE, S.FAILED, S.CANCELLED, S.CLEANUP},
    S.ACTIVE: {S.PAUSED, S.COMPLETED, S.FAILED, S.CANCELLED, S.CLEANUP},
    S.PAUSED: {S.ACTIVE, S.FAILED, S.CANCELLED, S.CLEANUP},
    S.COMPLETED: {S.CLEANUP},
    S.FAILED: {S.CLEANUP},
    S.CANCELLED: {S.CLEANUP},
    S.CLEANUP: set(),
}

# executor is required by default; task-loop and step-processor are optional;
# frontend-api is never registered.
REGISTERED = {"executor": True, "task-loop": False, "step-processor": False}
MODULES = [*REGISTERED, "frontend-api"]
LINK_TIMEOUT_MS = 2_500
CLEANUP_TIMEOUT_MS = 1_500
# Few sessions per run, so random commands pile up on each and reach deep states.
MAX_SESSIONS = 3


class Rejected(Exception):
    """The model's rejection, carrying the expected error code."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class ModelModule:
    session_id: uuid.UUID
    status: SessionStatus = S.ACTIVE


@dataclass
class ModelSession:
    """What the rules say one workflow session is."""

    session_id: uuid.UUID
    required: list[str]
    timeout_ms: int | None
    created_at: datetime
    status: SessionStatus = S.INITIALIZING
    modules: dict[str, ModelModule] = field(default_factory=dict)
    destroyed: bool = False
    failure: ErrorCode | None = None
    last_activity: datetime = field(init=False)
    status_since: datetime = field(init=False)

    def __post_init__(self) -> None:
        self.last_activity = self.status_since = self.created_at

    @property
    def missing(self) -> list[str]:
        return [m for m in self.required if m not in self.modules]


class Model:
    """The rules, in plain Python. Each command returns how many events it appends, or
    raises ``Rejected``; a rejected command changes nothing."""

    def __init__(self) -> None:
        self.sessions: dict[uuid.UUID, ModelSession] = {}

    def session(self, sid: uuid.UUID) -> ModelSession:
        if sid not in self.sessions:
            raise Rejected(ErrorCode.UNKNOWN_SESSION)
        return self.sessions[sid]

    @staticmethod
    def _open(s: ModelSession, *, cleanup_ok: bool) -> None:
        if s.destroyed:
            raise Rejected(ErrorCode.SESSION_DESTROYED)
        if s.status is S.CLEANUP and not cleanup_ok:
            raise Rejected(ErrorCode.SESSION_CLOSED)

    @staticmethod
    def _allowed(principal: set[str] | None, module_id: str) -> None:
        if principal is not None and module_id not in principal:
            raise Rejected(ErrorCode.FORBIDDEN)

    def _status(self, s: ModelSession, status: SessionStatus, now: datetime) -> int:
        s.status = status
        s.status_since = s.last_activity = now
        return 1

    def _settle(self, s: ModelSession, now: datetime) -> int:
        if s.destroyed:
            return 0
        if s.status is S.INITIALIZING and not s.missing:
            return self._status(s, S.ACTIVE, now)
        if s.status is S.CLEANUP and not s.modules:
            s.destroyed = True
            s.modules = {}
            return 1
        return 0

    def _fail(self, s: ModelSession, code: ErrorCode, now: datetime) -> int:
        s.failure = code
        return (
            self._status(s, S.FAILED, now) + self._status(s, S.CLEANUP, now) + self._settle(s, now)
        )

    def create(
        self, sid: uuid.UUID, required: list[str] | None, timeout_ms: int | None, now: datetime
    ) -> int:
        if required is not None and any(m not in REGISTERED for m in required):
            raise Rejected(ErrorCode.MODULE_NOT_REGISTERED)
        wanted = (
            sorted(m for m, req in REGISTERED.items() if req)
            if required is None
            else sorted(set(required))
        )
        s = ModelSession(sid, wanted, timeout_ms, now)
        self.sessions[sid] = s
        return 1 + self._settle(s, now)

    def set_status(self, sid: uuid.UUID, status: SessionStatus, now: datetime) -> int:
        s = self.session(sid)
        self._open(s, cleanup_ok=status is S.CLEANUP)
        if status is s.status:
            return 0
        if status not in TABLE[s.status]:
            raise Rejected(ErrorCode.INVALID_TRANSITION)
        s.failure = None if status is S.FAILED else s.failure
        return self._status(s, status, now) + self._settle(s, now)

    def link(
        self,
        sid: uuid.UUID,
        module_id: str,
        module_session: uuid.UUID,
        principal: set[str] | None,
        now: datetime,
    ) -> int:
        s = self.session(sid)
        self._allowed(principal, module_id)
        self._open(s, cleanup_ok=False)
        if s.status not in LIVE:
            raise Rejected(ErrorCode.SESSION_CLOSED)
        if module_id not in REGISTERED:
            raise Rejected(ErrorCode.MODULE_NOT_REGISTERED)
        if module_id in s.modules:
            if s.modules[module_id].session_id == module_session:
                return 0
            raise Rejected(ErrorCode.MODULE_ALREADY_LINKED)
        s.modules[module_id] = ModelModule(module_session)
        s.last_activity = now
        return 1 + self._settle(s, now)

    def unlink(
        self, sid: uuid.UUID, module_id: str, principal: set[str] | None, now: datetime
    ) -> int:
        s = self.session(sid)
        self._allowed(principal, module_id)
        self._open(s, cleanup_ok=True)
        if module_id not in s.modules:
            return 0
        del s.modules[module_id]
        s.last_activity = now
        return 1 + self._settle(s, now)

    def set_module_status(
        self,
        sid: uuid.UUID,
        module_id: str,
        status: SessionStatus,
        principal: set[str] | None,
        now: datetime,
    ) -> int:
        s = self.session(sid)
        self._allowed(principal, module_id)
        self._open(s, cleanup_ok=True)
        if module_id not in s.modules:
            raise Rejected(ErrorCode.MODULE_NOT_LINKED)
        module = s.modules[module_id]
        if status is module.status:
            return 0
        if status not in TABLE[module.status]:
            raise Rejected(ErrorCode.INVALID_TRANSITION)
        module.status = status
        s.last_activity = now
        events = 1
        if status is S.FAILED and module_id in s.required and s.status in LIVE:
            events += self._fail(s, ErrorCode.MODULE_ERROR, now)
        return events + self._settle(s, now)

    def activity(
        self, sid: uuid.UUID, module_id: str | None, principal: set[str] | None, now: datetime
    ) -> int:
        s = self.session(sid)
        if module_id is not None:
            self._allowed(principal, module_id)
        self._open(s, cleanup_ok=True)
        if module_id is not None and module_id not in s.modules:
            raise Rejected(ErrorCode.MODULE_NOT_LINKED)
        s.last_activity = now
        return 1

    def error(
        self,
        sid: uuid.UUID,
        module_id: str | None,
        fatal: bool,
        principal: set[str] | None,
        now: datetime,
    ) -> int:
        s = self.session(sid)
        if module_id is not None:
            self._allowed(principal, module_id)
        self._open(s, cleanup_ok=True)
        if fatal and module_id in s.required and s.status in LIVE:
            return 1 + self._fail(s, ErrorCode.MODULE_ERROR, now)
        return 1

    def destroy(self, sid: uuid.UUID, now: datetime) -> int:
        s = self.session(sid)
        if s.destroyed:
            return 0
        events = self._status(s, S.CLEANUP, now) if s.status is not S.CLEANUP else 0
        return events + self._settle(s, now)

    def timeouts(self, now: datetime) -> None:
        ms = timedelta(milliseconds=1)
        for s in self.sessions.values():
            while not s.destroyed:
                if s.status is S.CLEANUP:
                    if now >= s.status_since + CLEANUP_TIMEOUT_MS * ms:
                        s.destroyed = True
                        s.modules = {}
                    break
                if (
                    s.status is S.INITIALIZING
                    and s.missing
                    and now >= s.created_at + LINK_TIMEOUT_MS * ms
                ):
                    self._fail(s, ErrorCode.LINK_TIMEOUT, now)
                    continue
                if (
                    s.status in (S.INITIALIZING, S.ACTIVE)
                    and s.timeout_ms is not None
                    and now >= s.last_activity + s.timeout_ms * ms
                ):
                    self._fail(s, ErrorCode.INACTIVITY_TIMEOUT, now)
                    continue
                break


# --- the machine --------------------------------------------------------------------

modules = st.sampled_from(MODULES)
statuses = st.sampled_from(list(SessionStatus))
# Two module session ids per (session, module), so the same link comes round again.
link_choice = st.integers(0, 1)
# Who sends a module's command: the operator (any module), the module itself, or
# another module (FORBIDDEN). Weighted towards commands that may succeed.
principals = st.sampled_from([None, None, "own", "other"])
requirements = st.sampled_from(
    [None, None, [], ["task-loop"], ["executor", "step-processor"], ["frontend-api"]]
)
timeouts = st.sampled_from([None, 2_000, 2_000])


class SessionMachine(RuleBasedStateMachine):
    """Drives the coordinator and the model with the same commands; after each step
    every session must look the same on both sides."""

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock()
        self.store = EventStore("memory://")
        self.model = Model()
        self.unknown = uuid.uuid4()
        self.restarts = 0
        self.coordinator = self._start()
        for module_id, required in REGISTERED.items():
            self.run(self.coordinator.register_module(module_id, required=required))

    def _start(self) -> SessionCoordinator:
        coordinator = SessionCoordinator(self.store, clock=self.clock)
        self.run(coordinator.start())
        return coordinator

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        try:
            for sid in self.model.sessions:
                verdict = self.run(self.coordinator.verify_history(sid))
                assert verdict.ok, verdict
            assert self.run(self.coordinator.verify_history(REGISTRY_ID)).ok
        finally:
            self.run(self.coordinator.close())
            self.store.close()
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    # -- one command, run on both sides ------------------------------------------------

    def both(self, command: Command, principal: Principal | None, model_call: Any) -> None:
        """Run ``command`` on the coordinator and ``model_call()`` on the model: both
        accept it appending the same number of events, or both reject it with the same
        error code."""
        try:
            expected: int | ErrorCode = model_call()
        except Rejected as rejected:
            expected = rejected.code
        try:
            result = self.run(self.coordinator.handle(command, principal))
        except CommandRejected as rejected:
            actual: int | ErrorCode = rejected.code
        else:
            assert isinstance(result, Accepted)
            actual = result.events
        assert actual == expected, f"{command}: coordinator {actual!r}, model {expected!r}"

    @staticmethod
    def _principal(kind: str | None, module_id: str) -> tuple[Principal | None, set[str] | None]:
        if kind is None:
            return None, None  # the coordinator's default operator acts for every module
        allowed = {module_id} if kind == "own" else {m for m in MODULES if m != module_id}
        return Principal(f"{kind}-module", frozenset(allowed)), allowed

    def _create(self, required: list[str] | None, timeout_ms: int | None) -> uuid.UUID | None:
        sid = uuid.uuid4()
        config = WorkflowConfig(
            required_modules=required,
            timeout_ms=timeout_ms,
            link_timeout_ms=LINK_TIMEOUT_MS,
            cleanup_timeout_ms=CLEANUP_TIMEOUT_MS,
        )
        now = self.clock.now()
        self.both(
            CreateWorkflowSession(steps=["s"], config=config, session_id=sid),
            None,
            lambda: self.model.create(sid, required, timeout_ms, now),
        )
        return sid if sid in self.model.sessions else None

    # -- rules ----------------------------------------------------------------------------

    @initialize(
        target=sessions, configs=st.lists(st.tuples(requirements, timeouts), min_size=2, max_size=2)
    )
    def first_sessions(self, configs: list[tuple[list[str] | None, int | None]]) -> Any:
        """Every run starts with sessions to work on."""
        created = [self._create(required, timeout_ms) for required, timeout_ms in configs]
        return multiple(*(sid for sid in created if sid is not None))

    @precondition(lambda self: len(self.model.sessions) < MAX_SESSIONS)
    @rule(target=sessions, required=requirements, timeout_ms=timeouts)
    def create(self, required: list[str] | None, timeout_ms: int | None) -> Any:
        sid = self._create(required, timeout_ms)
        return multiple() if sid is None else sid

    @rule(sid=sessions, module_id=modules, choice=link_choice, who=principals)
    def link(self, sid: uuid.UUID, module_id: str, choice: int, who: str | None) -> None:
        module_session = uuid.uuid5(sid, f"{module_id}/{choice}")
        principal, allowed = self._principal(who, module_id)
        now = self.clock.now()
        self.both(
            LinkModuleSession(
                session_id=sid, module_id=module_id, module_session_id=module_session
            ),
            principal,
            lambda: self.model.link(sid, module_id, module_session, allowed, now),
        )

    @rule(sid=sessions, module_id=modules, who=principals)
    def unlink(self, sid: uuid.UUID, module_id: str, who: str | None) -> None:
        principal, allowed = self._principal(who, module_id)
        now = self.clock.now()
        self.both(
            UnlinkModuleSession(session_id=sid, module_id=module_id),
            principal,
            lambda: self.model.unlink(sid, module_id, allowed, now),
        )

    @rule(sid=sessions, status=statuses)
    def set_status(self, sid: uuid.UUID, status: SessionStatus) -> None:
        now = self.clock.now()
        self.both(
            UpdateSessionStatus(session_id=sid, status=status),
            None,
            lambda: self.model.set_status(sid, status, now),
        )

    @rule(sid=sessions, module_id=modules, status=statuses, who=principals)
    def set_module_status(
        self, sid: uuid.UUID, module_id: str, status: SessionStatus, who: str | None
    ) -> None:
        principal, allowed = self._principal(who, module_id)
        now = self.clock.now()
        self.both(
            UpdateSessionStatus(session_id=sid, status=status, module_id=module_id),
            principal,
            lambda: self.model.set_module_status(sid, module_id, status, allowed, now),
        )

    @rule(sid=sessions, module_id=st.none() | modules, who=principals)
    def activity(self, sid: uuid.UUID, module_id: str | None, who: str | None) -> None:
        principal, allowed = self._principal(who, module_id or "executor")
        now = self.clock.now()
        self.both(
            RecordActivity(session_id=sid, module_id=module_id),
            principal,
            lambda: self.model.activity(sid, module_id, allowed, now),
        )

    @rule(sid=sessions, module_id=st.none() | modules, fatal=st.booleans())
    def error(self, sid: uuid.UUID, module_id: str | None, fatal: bool) -> None:
        error = StandardError(code=ErrorCode.INTERNAL, message="boom", module_id=module_id)
        now = self.clock.now()
        self.both(
            ReportError(session_id=sid, error=error, module_id=module_id, fatal=fatal),
            None,
            lambda: self.model.error(sid, module_id, fatal, None, now),
        )

    @rule(sid=sessions)
    def destroy(self, sid: uuid.UUID) -> None:
        now = self.clock.now()
        self.both(
            DestroyWorkflowSession(session_id=sid), None, lambda: self.model.destroy(sid, now)
        )

    @rule(module_id=modules, status=statuses)
    def unknown_session(self, module_id: str, status: SessionStatus) -> None:
        """Commands naming a session nobody created."""
        now = self.clock.now()
        sid = self.unknown
        self.both(
            LinkModuleSession(session_id=sid, module_id=module_id, module_session_id=sid),
            None,
            lambda: self.model.link(sid, module_id, sid, None, now),
        )
        self.both(
            UpdateSessionStatus(session_id=sid, status=status),
            None,
            lambda: self.model.set_status(sid, status, now),
        )

    @rule(ms=st.sampled_from([300, 1_000, 1_600, 2_100]))
    def advance_clock(self, ms: int) -> None:
        """Time passes; every due timeout fires on both sides."""
        now = self.clock.advance(milliseconds=ms)
        self.model.timeouts(now)
        self.run(self.coordinator.run_timeouts())

    @precondition(lambda self: self.restarts < 2)
    @rule()
    def restart(self) -> None:
        """Close the coordinator and start a new one on the same store: projections,
        applied commands and timers carry over."""
        self.run(self.coordinator.close())
        self.restarts += 1
        self.coordinator = self._start()

    # -- what must always agree -------------------------------------------------------

    @invariant()
    def sessions_agree(self) -> None:
        for sid, expected in self.model.sessions.items():
            actual = self.run(self.coordinator.get_workflow_session(sid))
            assert actual is not None, sid
            assert actual.destroyed == expected.destroyed, sid
            assert actual.status is expected.status, (sid, actual.status, expected.status)
            assert {m: (i.session_id, i.status) for m, i in actual.modules.items()} == {
                m: (i.session_id, i.status) for m, i in expected.modules.items()
            }
            assert (actual.failure.code if actual.failure else None) == expected.failure
        live = {
            sid for sid, s in self.model.sessions.items() if not s.destroyed and s.status in LIVE
        }
        assert set(self.coordinator.list_active_workflow_sessions()) == live


SessionMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessionMachine = SessionMachine.TestCase
