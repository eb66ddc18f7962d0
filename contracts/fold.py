"""How a session's events add up to its state: one fold shared by every reader.

The coordinator's aggregates, its projections, the SDK's local projection and an
auditor's replay all call ``fold_session``, so they cannot disagree on what a history
means.
"""

from __future__ import annotations

from typing import Final

import msgspec

from contracts.errors import ValidationError
from contracts.events import (
    ActivityRecorded,
    Destroyed,
    ErrorReported,
    EventEnvelope,
    Linked,
    SessionCreated,
    SessionEvent,
    StatusChanged,
    Unlinked,
)
from contracts.model import ModuleSessionInfo, WorkflowSession
from contracts.status import SessionStatus

__all__ = ["LINKED_ID_FIELDS", "fold_history", "fold_session"]

# Modules whose linked session id the seed surfaces on WorkflowSession itself.
LINKED_ID_FIELDS: Final[dict[str, str]] = {
    "executor": "executor_session_id",
    "executor-streamer": "stream_id",
    "ai-integration": "ai_connection_id",
}

_replace = msgspec.structs.replace


def fold_session(state: WorkflowSession | None, env: SessionEvent) -> WorkflowSession:
    """Apply one event to a session's state (``None`` before its first event).

    Raises ``ValidationError`` when the event cannot follow ``state``: wrong session,
    version out of sequence, or a first event that is not ``SessionCreated``.
    """
    event = env.event
    at = env.occurred_at
    if state is None:
        if not isinstance(event, SessionCreated) or env.version != 1:
            raise ValidationError(
                f"session {env.session_id} must start with session.created at version 1, "
                f"got {env.type} at version {env.version}",
                field="event",
            )
        return WorkflowSession(
            session_id=env.session_id,
            status=SessionStatus.INITIALIZING,
            created_at=at,
            last_activity=at,
            status_changed_at=at,
            steps=list(event.steps),
            required_modules=list(event.required_modules),
            metadata=dict(event.config.metadata),
            config=event.config,
            version=1,
        )
    if env.session_id.int != state.session_id.int:
        raise ValidationError(
            f"event of session {env.session_id} applied to session {state.session_id}",
            field="session_id",
        )
    if env.version != state.version + 1:
        raise ValidationError(
            f"session {state.session_id} is at version {state.version}; "
            f"event version {env.version} does not follow",
            field="version",
        )

    if isinstance(event, StatusChanged):
        if event.module_id is None:
            return _replace(
                state,
                status=event.new_status,
                status_changed_at=at,
                last_activity=at,
                failure=event.error if event.new_status is SessionStatus.FAILED else state.failure,
                version=env.version,
            )
        modules = dict(state.modules)
        info = modules.get(event.module_id)
        if info is not None:
            modules[event.module_id] = _replace(info, status=event.new_status, last_activity=at)
        return _replace(state, modules=modules, last_activity=at, version=env.version)

    if isinstance(event, Linked):
        modules = dict(state.modules)
        modules[event.module_id] = ModuleSessionInfo(
            module_id=event.module_id,
            session_id=event.module_session_id,
            linked_workflow_session_id=state.session_id,
            status=SessionStatus.ACTIVE,
            created_at=at,
            last_activity=at,
            metadata=dict(event.metadata),
            config=event.config,
        )
        changes: dict[str, object] = {"modules": modules, "last_activity": at}
        if event.module_id in LINKED_ID_FIELDS:
            changes[LINKED_ID_FIELDS[event.module_id]] = event.module_session_id
        return _replace(state, version=env.version, **changes)

    if isinstance(event, Unlinked):
        modules = dict(state.modules)
        modules.pop(event.module_id, None)
        changes = {"modules": modules, "last_activity": at}
        if event.module_id in LINKED_ID_FIELDS:
            changes[LINKED_ID_FIELDS[event.module_id]] = None
        return _replace(state, version=env.version, **changes)

    if isinstance(event, ActivityRecorded):
        if event.module_id is not None and event.module_id in state.modules:
            modules = dict(state.modules)
            modules[event.module_id] = _replace(modules[event.module_id], last_activity=at)
            return _replace(state, modules=modules, last_activity=at, version=env.version)
        return _replace(state, last_activity=at, version=env.version)

    if isinstance(event, ErrorReported):
        return _replace(state, version=env.version)

    if isinstance(event, Destroyed):
        # Module sessions that never unlinked are recorded in the event as orphans;
        # the destroyed session itself holds no links any more.
        changes = dict.fromkeys(LINKED_ID_FIELDS.values())
        return _replace(state, destroyed=True, modules={}, version=env.version, **changes)

    raise ValidationError(
        f"event type {env.type} does not belong to a workflow session", field="event.type"
    )


def fold_history(envelopes: list[EventEnvelope]) -> WorkflowSession | None:
    """The state a whole (ordered) history adds up to."""
    state: WorkflowSession | None = None
    for env in envelopes:
        state = fold_session(state, env)
    return state
