"""Coordinator commands, their results, and the request/reply envelopes.

One command per method of the seed's ``SessionCoordinator`` (plus the writes a module's
``ISessionManager`` sends: status, activity, errors). Every request carries a
``command_id``: the coordinator applies a retried command once and answers it with the
first reply.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Final

import msgspec

from contracts.errors import StandardError, ValidationError
from contracts.events import EventEnvelope
from contracts.ids import ModuleId
from contracts.model import (
    CoordinatorHealth,
    Metadata,
    ModuleInfo,
    ModuleSessionConfig,
    SessionIntegrityReport,
    Timestamp,
    WorkflowConfig,
    WorkflowSession,
)
from contracts.status import SessionStatus

__all__ = [
    "COMMAND_TYPES",
    "WRITE_COMMANDS",
    "Accepted",
    "Command",
    "CommandReply",
    "CommandRequest",
    "CreateWorkflowSession",
    "DestroyWorkflowSession",
    "EventsPage",
    "FindWorkflowSessions",
    "GetCoordinatorHealth",
    "GetIdentity",
    "GetLinkedSessions",
    "GetSessionHistory",
    "GetWorkflowSession",
    "HealthResult",
    "IdentityResult",
    "IntegrityResult",
    "LinkModuleSession",
    "LinkedSessions",
    "ListActiveWorkflowSessions",
    "ListModules",
    "ListWorkflowSessions",
    "ModulesResult",
    "ReadEvents",
    "RecordActivity",
    "RegisterModule",
    "RepairResult",
    "RepairSessionIntegrity",
    "ReportError",
    "ReportOrphan",
    "Result",
    "SessionHistory",
    "SessionIds",
    "SessionResult",
    "SessionsPage",
    "UnlinkModuleSession",
    "UnregisterModule",
    "UpdateSessionStatus",
    "ValidateSessionIntegrity",
]

PageSize = Annotated[int, msgspec.Meta(ge=1, le=10_000)]


class CommandBase(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every command; the ``type`` tag names it on the wire."""


# --- writes: workflow sessions -------------------------------------------------------


class CreateWorkflowSession(CommandBase, frozen=True, tag="create-workflow-session"):
    """Seed: createWorkflowSession(steps, config). ``session_id`` may be chosen by the
    caller (so a retry after a lost reply cannot create two sessions); else the
    coordinator picks one."""

    steps: list[str] = msgspec.field(default_factory=list)
    config: WorkflowConfig = msgspec.field(default_factory=WorkflowConfig)
    session_id: uuid.UUID | None = None


class DestroyWorkflowSession(CommandBase, frozen=True, tag="destroy-workflow-session"):
    """Seed: destroyWorkflowSession(sessionId). Moves the session to CLEANUP; it is
    destroyed once every linked module has unlinked (or the cleanup timeout passed)."""

    session_id: uuid.UUID
    reason: str | None = None


class LinkModuleSession(CommandBase, frozen=True, tag="link-module-session"):
    """Seed: linkModuleSession(workflowSessionId, moduleId, moduleSessionId)."""

    session_id: uuid.UUID
    module_id: ModuleId
    module_session_id: uuid.UUID
    config: ModuleSessionConfig = msgspec.field(default_factory=ModuleSessionConfig)
    metadata: Metadata = msgspec.field(default_factory=dict)


class UnlinkModuleSession(CommandBase, frozen=True, tag="unlink-module-session"):
    """Seed: unlinkModuleSession(workflowSessionId, moduleId)."""

    session_id: uuid.UUID
    module_id: ModuleId
    reason: str | None = None


class UpdateSessionStatus(CommandBase, frozen=True, tag="update-session-status"):
    """Seed rule 3: every status change goes through the coordinator. ``module_id``
    None changes the workflow session's status, else that module's session status."""

    session_id: uuid.UUID
    status: SessionStatus
    module_id: ModuleId | None = None
    reason: str | None = None


class RecordActivity(CommandBase, frozen=True, tag="record-activity"):
    """ISessionManager.recordActivity: resets the inactivity timeout."""

    session_id: uuid.UUID
    module_id: ModuleId | None = None


class ReportError(CommandBase, frozen=True, tag="report-error"):
    """A module reports an error on its session (onSessionError)."""

    session_id: uuid.UUID
    error: StandardError
    module_id: ModuleId | None = None
    # A required module's fatal error fails the workflow session; a non-fatal one is
    # only recorded.
    fatal: bool = True


class ReportOrphan(CommandBase, frozen=True, tag="report-orphan"):
    """A module holds a session for a workflow session that is destroyed or unknown."""

    session_id: uuid.UUID
    module_id: ModuleId
    module_session_id: uuid.UUID


class RepairSessionIntegrity(CommandBase, frozen=True, tag="repair-session-integrity"):
    """Apply what the integrity report recommends and can be fixed."""

    session_id: uuid.UUID


# --- writes: module registry ---------------------------------------------------------


class RegisterModule(CommandBase, frozen=True, tag="register-module"):
    """Seed: registerModule(moduleId, sessionManager). A required module must link to
    every new workflow session before it becomes ACTIVE."""

    module_id: ModuleId
    required: bool = True
    capabilities: list[str] = msgspec.field(default_factory=list)


class UnregisterModule(CommandBase, frozen=True, tag="unregister-module"):
    """Seed: unregisterModule(moduleId)."""

    module_id: ModuleId
    reason: str | None = None


# --- reads ---------------------------------------------------------------------------


class GetWorkflowSession(CommandBase, frozen=True, tag="get-workflow-session"):
    """Seed: getWorkflowSession(sessionId)."""

    session_id: uuid.UUID


class ListActiveWorkflowSessions(CommandBase, frozen=True, tag="list-active-workflow-sessions"):
    """Seed: listActiveWorkflowSessions(), with optional filters."""

    status: SessionStatus | None = None
    module_id: ModuleId | None = None


class SessionsCursor(msgspec.Struct, frozen=True, kw_only=True):
    """Where a page of sessions ended: the last session's creation time (microseconds
    since the epoch) and id, the order pages are listed in."""

    created_us: int
    session_id: uuid.UUID


class ListWorkflowSessions(CommandBase, frozen=True, tag="list-workflow-sessions"):
    """Every session not yet destroyed, with full state, a page at a time (oldest
    first): how a module catches up on start.

    ``after`` (the previous page's ``next_after``) lists the sessions ordered after
    it: a session created or destroyed between two pages shifts no other one, so none
    that stays live is skipped. ``offset`` is kept for older clients; sessions
    destroyed between its pages move the later ones down, past the next offset."""

    module_id: ModuleId | None = None
    status: SessionStatus | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: PageSize = 500
    after: SessionsCursor | None = None
    # Operators' filters (the console's sessions list); a coordinator that predates
    # them ignores them. ``created_from`` <= created_at < ``created_to``;
    # ``has_errors``: a failure is recorded (the session FAILED, or is cleaning up or
    # destroyed after it); ``idle_since``: no activity after that time (stale);
    # ``match_id``: the session with that id, or the one a module session with that id
    # is linked to.
    created_from: Timestamp | None = None
    created_to: Timestamp | None = None
    has_errors: bool = False
    idle_since: Timestamp | None = None
    match_id: uuid.UUID | None = None
    # Newest first: ``after`` then lists the sessions ordered before the cursor.
    newest_first: bool = False


class FindWorkflowSessions(CommandBase, frozen=True, tag="find-workflow-sessions"):
    """Every workflow session, live or destroyed, whose id is ``match_id`` or that had a
    module session with that id linked at any time (the answer: a ``SessionsPage``
    with no next page, newest first; a destroyed one has ``destroyed`` set).

    Unlike ``ListWorkflowSessions``' ``match_id``, which sees the links live sessions
    hold now, this also finds a session destroyed long ago (through the coordinator's
    module-session lookup in its store) and a link since undone."""

    match_id: uuid.UUID
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 100


class GetLinkedSessions(CommandBase, frozen=True, tag="get-linked-sessions"):
    """Seed: getLinkedSessions(workflowSessionId)."""

    session_id: uuid.UUID


class ListModules(CommandBase, frozen=True, tag="list-modules"):
    """Registered modules with health (seed: getModuleSessionManager, over the bus)."""


class GetCoordinatorHealth(CommandBase, frozen=True, tag="get-coordinator-health"):
    """Seed: getCoordinatorHealth()."""


class GetIdentity(CommandBase, frozen=True, tag="get-identity"):
    """Who the coordinator takes the sender for (its broker user) and what that user
    may do: how an operator tool tells an operator from an auditor."""


class ValidateSessionIntegrity(CommandBase, frozen=True, tag="validate-session-integrity"):
    """Seed: validateSessionIntegrity(sessionId)."""

    session_id: uuid.UUID


class GetSessionHistory(CommandBase, frozen=True, tag="get-session-history"):
    """Every event of one session, and the state as of a time or a version."""

    session_id: uuid.UUID
    as_of: Timestamp | None = None
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None


class ReadEvents(CommandBase, frozen=True, tag="read-events"):
    """The global event feed after a position (for relays, auditors, gap fill)."""

    after_position: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: PageSize = 1000
    session_id: uuid.UUID | None = None


Command = (
    CreateWorkflowSession
    | DestroyWorkflowSession
    | LinkModuleSession
    | UnlinkModuleSession
    | UpdateSessionStatus
    | RecordActivity
    | ReportError
    | ReportOrphan
    | RepairSessionIntegrity
    | RegisterModule
    | UnregisterModule
    | GetWorkflowSession
    | ListActiveWorkflowSessions
    | ListWorkflowSessions
    | GetLinkedSessions
    | ListModules
    | GetCoordinatorHealth
    | GetIdentity
    | ValidateSessionIntegrity
    | GetSessionHistory
    | ReadEvents
    | FindWorkflowSessions
)

COMMAND_TYPES: Final[tuple[type[CommandBase], ...]] = (
    CreateWorkflowSession,
    DestroyWorkflowSession,
    LinkModuleSession,
    UnlinkModuleSession,
    UpdateSessionStatus,
    RecordActivity,
    ReportError,
    ReportOrphan,
    RepairSessionIntegrity,
    RegisterModule,
    UnregisterModule,
    GetWorkflowSession,
    ListActiveWorkflowSessions,
    ListWorkflowSessions,
    GetLinkedSessions,
    ListModules,
    GetCoordinatorHealth,
    GetIdentity,
    ValidateSessionIntegrity,
    GetSessionHistory,
    ReadEvents,
    FindWorkflowSessions,
)

# Commands that append events; the rest only read projections.
WRITE_COMMANDS: Final[frozenset[type[CommandBase]]] = frozenset(
    {
        CreateWorkflowSession,
        DestroyWorkflowSession,
        LinkModuleSession,
        UnlinkModuleSession,
        UpdateSessionStatus,
        RecordActivity,
        ReportError,
        ReportOrphan,
        RepairSessionIntegrity,
        RegisterModule,
        UnregisterModule,
    }
)


# --- results -------------------------------------------------------------------------


class ResultBase(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every command result."""


class Accepted(ResultBase, frozen=True, tag="accepted"):
    """A write was applied (or was a no-op). ``version`` is the session's version
    after it; ``events`` how many events it appended (0 for a no-op)."""

    session_id: uuid.UUID | None = None
    version: int = 0
    events: int = 0


class SessionResult(ResultBase, frozen=True, tag="session"):
    """A workflow session, or ``None`` when unknown (getWorkflowSession returns null)."""

    session: WorkflowSession | None


class SessionsPage(ResultBase, frozen=True, tag="sessions"):
    """A page of sessions; ``next_offset`` and ``next_after`` are ``None`` on the last
    page. ``position`` is the store position the coordinator's read models reflected
    when it read the page: every event at or before it is in these states."""

    sessions: list[WorkflowSession]
    next_offset: int | None = None
    next_after: SessionsCursor | None = None
    position: int = 0


class SessionIds(ResultBase, frozen=True, tag="session-ids"):
    """listActiveWorkflowSessions() -> string[]."""

    session_ids: list[uuid.UUID]


class LinkedSessions(ResultBase, frozen=True, tag="linked-sessions"):
    """getLinkedSessions() -> moduleId -> moduleSessionId."""

    links: dict[ModuleId, uuid.UUID]


class ModulesResult(ResultBase, frozen=True, tag="modules"):
    """Registered modules."""

    modules: list[ModuleInfo]


class HealthResult(ResultBase, frozen=True, tag="health"):
    """getCoordinatorHealth()."""

    health: CoordinatorHealth


class IdentityResult(ResultBase, frozen=True, tag="identity"):
    """getIdentity(): the broker user, the module ids it may act for (``None``: any
    module, an operator), and whether it may only read (an auditor)."""

    user: str
    modules: list[ModuleId] | None = None
    read_only: bool = False


class IntegrityResult(ResultBase, frozen=True, tag="integrity"):
    """validateSessionIntegrity()."""

    report: SessionIntegrityReport


class RepairResult(ResultBase, frozen=True, tag="repair"):
    """What a repair did, one line per action, and the report after it."""

    actions: list[str]
    report: SessionIntegrityReport


class SessionHistory(ResultBase, frozen=True, tag="history"):
    """A session's events up to the requested point and the state they add up to."""

    events: list[EventEnvelope]
    state: WorkflowSession | None


class EventsPage(ResultBase, frozen=True, tag="events"):
    """A page of the global feed. ``next_position`` is the position to ask after next."""

    events: list[EventEnvelope]
    next_position: int


Result = (
    Accepted
    | SessionResult
    | SessionIds
    | SessionsPage
    | LinkedSessions
    | ModulesResult
    | HealthResult
    | IdentityResult
    | IntegrityResult
    | RepairResult
    | SessionHistory
    | EventsPage
)


# --- envelopes -----------------------------------------------------------------------


class CommandRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A command on the commands queue. Who sent it is not in the body: the coordinator
    takes it from the broker-validated AMQP ``user_id``."""

    command_id: uuid.UUID
    issued_at: Timestamp
    command: Command
    correlation_id: uuid.UUID | None = None


class CommandReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to one ``CommandRequest``: exactly one of ``result`` and ``error``."""

    command_id: uuid.UUID
    result: Result | None = None
    error: StandardError | None = None

    def __post_init__(self) -> None:
        if (self.result is None) == (self.error is None):
            raise ValidationError("a reply carries exactly one of result and error")
