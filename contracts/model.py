"""The seed's data types: sessions, configuration, health and integrity reports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from contracts.errors import StandardError
from contracts.ids import ModuleId
from contracts.status import SessionStatus

__all__ = [
    "CoordinatorHealth",
    "Heartbeat",
    "ModuleInfo",
    "ModuleSessionConfig",
    "ModuleSessionInfo",
    "SessionDestroyedNotice",
    "SessionErrorNotice",
    "SessionIntegrityReport",
    "SessionManagerHealth",
    "SessionOpenedNotice",
    "SessionStatusChangedNotice",
    "Timestamp",
    "WorkflowConfig",
    "WorkflowSession",
]

# Every timestamp on the wire is timezone-aware; naive datetimes are refused.
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Milliseconds = Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600 * 1000)]
Metadata = dict[str, Any]


class Model(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every data type: immutable, keyword-only, unknown fields ignored so that
    an older reader accepts a newer writer's message."""


class ModuleSessionConfig(Model, frozen=True):
    """Per-module options (seed: ModuleSessionConfig).

    ``timeout_ms`` is an inactivity timeout the coordinator enforces; ``retry_attempts``
    bounds the SDK's retries of the module's create hook.
    """

    timeout_ms: Milliseconds | None = None
    retry_attempts: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class WorkflowConfig(Model, frozen=True):
    """Options of a workflow session (the seed's ``WorkflowConfig``).

    ``required_modules`` overrides the registry's required set for this session.
    ``link_timeout_ms``: how long required modules have to link before the session
    fails. ``cleanup_timeout_ms``: how long linked modules have to unlink during
    CLEANUP before they are recorded as orphaned.
    """

    timeout_ms: Milliseconds | None = None
    link_timeout_ms: Milliseconds = 30_000
    cleanup_timeout_ms: Milliseconds = 30_000
    required_modules: list[ModuleId] | None = None
    module_configs: dict[ModuleId, ModuleSessionConfig] = msgspec.field(default_factory=dict)
    metadata: Metadata = msgspec.field(default_factory=dict)


class ModuleSessionInfo(Model, frozen=True):
    """A module's session linked to a workflow session (seed: ModuleSessionInfo)."""

    module_id: ModuleId
    session_id: uuid.UUID
    linked_workflow_session_id: uuid.UUID
    status: SessionStatus
    created_at: Timestamp
    last_activity: Timestamp
    metadata: Metadata = msgspec.field(default_factory=dict)
    config: ModuleSessionConfig = msgspec.field(default_factory=ModuleSessionConfig)


class WorkflowSession(Model, frozen=True):
    """The primary session entity (seed: WorkflowSession), as projected from its events.

    ``executor_session_id``, ``stream_id`` and ``ai_connection_id`` are the linked
    sessions of executor, executor-streamer and ai-integration: ``None`` until linked.
    """

    session_id: uuid.UUID
    status: SessionStatus
    created_at: Timestamp
    last_activity: Timestamp
    executor_session_id: uuid.UUID | None = None
    stream_id: uuid.UUID | None = None
    ai_connection_id: uuid.UUID | None = None
    steps: list[str] = msgspec.field(default_factory=list)
    required_modules: list[ModuleId] = msgspec.field(default_factory=list)
    modules: dict[ModuleId, ModuleSessionInfo] = msgspec.field(default_factory=dict)
    metadata: Metadata = msgspec.field(default_factory=dict)
    config: WorkflowConfig = msgspec.field(default_factory=WorkflowConfig)
    status_changed_at: Timestamp | None = None
    version: int = 0
    destroyed: bool = False
    failure: StandardError | None = None


class SessionManagerHealth(Model, frozen=True):
    """A module's health as it reports it (seed: SessionManagerHealth)."""

    module_id: ModuleId
    is_healthy: bool
    active_sessions: Annotated[int, msgspec.Meta(ge=0)]
    total_sessions: Annotated[int, msgspec.Meta(ge=0)]
    last_health_check: Timestamp
    errors: list[StandardError] = msgspec.field(default_factory=list)


class ModuleInfo(Model, frozen=True):
    """A registered module as the coordinator sees it."""

    module_id: ModuleId
    required: bool
    capabilities: list[str] = msgspec.field(default_factory=list)
    healthy: bool = False
    last_heartbeat: Timestamp | None = None
    active_sessions: int = 0
    # Instances whose heartbeats are fresh, and the newest error a heartbeat reported.
    instances: int = 0
    last_error: StandardError | None = None


class CoordinatorHealth(Model, frozen=True):
    """Seed: CoordinatorHealth. ``module_health_status`` is derived from heartbeat age."""

    total_workflow_sessions: int
    active_workflow_sessions: int
    registered_modules: list[ModuleId]
    module_health_status: dict[ModuleId, bool]
    last_health_check: Timestamp
    store_position: int = 0
    published_position: int = 0
    # Sessions not destroyed, by status (what /metrics calls sessions by status).
    sessions_by_status: dict[SessionStatus, int] = msgspec.field(default_factory=dict)
    # Commands this coordinator has answered since it started (a rate from two looks).
    commands_handled: int = 0


class SessionIntegrityReport(Model, frozen=True):
    """Seed: SessionIntegrityReport, for one workflow session."""

    workflow_session_id: uuid.UUID
    is_valid: bool
    linked_modules: list[ModuleId] = msgspec.field(default_factory=list)
    missing_links: list[ModuleId] = msgspec.field(default_factory=list)
    orphaned_sessions: dict[ModuleId, uuid.UUID] = msgspec.field(default_factory=dict)
    inconsistent_statuses: dict[ModuleId, SessionStatus] = msgspec.field(default_factory=dict)
    recommendations: list[str] = msgspec.field(default_factory=list)


# The shapes passed to SessionLifecycleCallbacks (seed), one per callback.


class SessionOpenedNotice(Model, frozen=True):
    """onSessionCreated(moduleId, workflowSessionId, moduleSessionId)."""

    module_id: ModuleId
    workflow_session_id: uuid.UUID
    module_session_id: uuid.UUID


class SessionStatusChangedNotice(Model, frozen=True):
    """onSessionStatusChanged(moduleId, workflowSessionId, oldStatus, newStatus)."""

    module_id: ModuleId
    workflow_session_id: uuid.UUID
    old_status: SessionStatus
    new_status: SessionStatus


class SessionDestroyedNotice(Model, frozen=True):
    """onSessionDestroyed(moduleId, workflowSessionId)."""

    module_id: ModuleId
    workflow_session_id: uuid.UUID


class SessionErrorNotice(Model, frozen=True):
    """onSessionError(moduleId, workflowSessionId, error)."""

    module_id: ModuleId
    workflow_session_id: uuid.UUID
    error: StandardError


class Heartbeat(Model, frozen=True):
    """A module instance's periodic liveness signal; not event-sourced.

    The coordinator derives ``module_health_status`` from the age of the last one,
    judged against ``interval_ms``.
    """

    module_id: ModuleId
    instance_id: uuid.UUID
    sent_at: Timestamp
    interval_ms: Milliseconds
    health: SessionManagerHealth
