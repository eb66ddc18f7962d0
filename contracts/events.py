"""Session lifecycle events and the envelope that carries them.

Each event type's tag is also its routing key on the events exchange
(``session.created``, ``session.status-changed`` …).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Final, Protocol

import msgspec

from contracts.errors import StandardError
from contracts.ids import ModuleId
from contracts.model import Metadata, ModuleSessionConfig, Timestamp, WorkflowConfig
from contracts.status import SessionStatus

__all__ = [
    "EVENT_TYPES",
    "GENESIS_HASH",
    "SCHEMA_VERSION",
    "ActivityRecorded",
    "Destroyed",
    "ErrorReported",
    "Event",
    "EventEnvelope",
    "Linked",
    "ModuleRegistered",
    "ModuleUnregistered",
    "OrphanCleanupRequested",
    "OrphanReported",
    "ReplayedEvent",
    "SessionCreated",
    "SessionEvent",
    "StatusChanged",
    "Unlinked",
    "event_type",
]

# Version of the envelope and event schemas this code writes. Readers upcast older ones.
SCHEMA_VERSION: Final = 1
# prev_hash of the first event of every stream.
GENESIS_HASH: Final = "0" * 64

# "$(?!\n)": msgspec matches with re.search, where a bare "$" also matches before a
# trailing newline.
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$(?!\n)")]


class EventBase(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every event payload; the ``type`` tag names the event on the wire."""


class SessionCreated(EventBase, frozen=True, tag="session.created"):
    """A workflow session was created; it starts INITIALIZING."""

    steps: list[str] = msgspec.field(default_factory=list)
    config: WorkflowConfig = msgspec.field(default_factory=WorkflowConfig)
    required_modules: list[ModuleId] = msgspec.field(default_factory=list)


class StatusChanged(EventBase, frozen=True, tag="session.status-changed"):
    """The status of the workflow session (``module_id`` None) or of one module's
    session changed."""

    old_status: SessionStatus
    new_status: SessionStatus
    module_id: ModuleId | None = None
    reason: str | None = None
    error: StandardError | None = None


class Linked(EventBase, frozen=True, tag="session.linked"):
    """A module linked its own session to the workflow session."""

    module_id: ModuleId
    module_session_id: uuid.UUID
    config: ModuleSessionConfig = msgspec.field(default_factory=ModuleSessionConfig)
    metadata: Metadata = msgspec.field(default_factory=dict)


class Unlinked(EventBase, frozen=True, tag="session.unlinked"):
    """A module's session was unlinked (the module destroyed it, or cleanup gave up)."""

    module_id: ModuleId
    module_session_id: uuid.UUID
    reason: str | None = None


class ActivityRecorded(EventBase, frozen=True, tag="session.activity-recorded"):
    """Activity on the workflow session (``module_id`` None) or a module's session."""

    module_id: ModuleId | None = None


class ErrorReported(EventBase, frozen=True, tag="session.error-reported"):
    """An error on the session, reported by a module or raised by the coordinator."""

    error: StandardError
    module_id: ModuleId | None = None


class Destroyed(EventBase, frozen=True, tag="session.destroyed"):
    """The workflow session ended. ``orphaned`` lists module sessions that did not
    unlink within the cleanup timeout (module id -> module session id)."""

    reason: str | None = None
    orphaned: dict[ModuleId, uuid.UUID] = msgspec.field(default_factory=dict)


class ModuleRegistered(EventBase, frozen=True, tag="module.registered"):
    """A module joined the registry (or changed its registration)."""

    module_id: ModuleId
    required: bool
    capabilities: list[str] = msgspec.field(default_factory=list)


class ModuleUnregistered(EventBase, frozen=True, tag="module.unregistered"):
    """A module left the registry."""

    module_id: ModuleId
    reason: str | None = None


class OrphanReported(EventBase, frozen=True, tag="module.orphan-reported"):
    """A module holds a session for a workflow session that is destroyed or unknown.
    Recorded on the registry stream, since the workflow stream may be closed."""

    module_id: ModuleId
    workflow_session_id: uuid.UUID
    module_session_id: uuid.UUID


class OrphanCleanupRequested(EventBase, frozen=True, tag="module.orphan-cleanup-requested"):
    """The coordinator asks a module to destroy an orphaned session of its own
    (integrity repair)."""

    module_id: ModuleId
    workflow_session_id: uuid.UUID
    module_session_id: uuid.UUID


Event = (
    SessionCreated
    | StatusChanged
    | Linked
    | Unlinked
    | ActivityRecorded
    | ErrorReported
    | Destroyed
    | ModuleRegistered
    | ModuleUnregistered
    | OrphanReported
    | OrphanCleanupRequested
)

EVENT_TYPES: Final[tuple[type[EventBase], ...]] = (
    SessionCreated,
    StatusChanged,
    Linked,
    Unlinked,
    ActivityRecorded,
    ErrorReported,
    Destroyed,
    ModuleRegistered,
    ModuleUnregistered,
    OrphanReported,
    OrphanCleanupRequested,
)


def event_type(event: EventBase | type[EventBase]) -> str:
    """The wire tag of an event (class or instance): also its routing key."""
    cls = event if isinstance(event, type) else type(event)
    return str(cls.__struct_config__.tag)


class EventEnvelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One stored event as it is published and replayed.

    ``version`` is the per-session sequence (1, 2, 3 …); ``position`` the global order
    in the coordinator's store, known once committed. ``hash`` covers every field but
    ``position`` and ``hash`` itself (see ``contracts.chain``), and ``prev_hash`` is the
    hash of the previous event of the same session, so history is tamper-evident.
    """

    event_id: uuid.UUID
    session_id: uuid.UUID
    version: Annotated[int, msgspec.Meta(ge=1)]
    occurred_at: Timestamp
    actor: str
    prev_hash: Sha256Hex
    hash: Sha256Hex
    event: Event
    position: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Default 1, not SCHEMA_VERSION: an envelope that omits it was written by version 1.
    schema_version: Annotated[int, msgspec.Meta(ge=1)] = 1
    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None

    @property
    def type(self) -> str:
        """The event's tag, e.g. ``session.linked``."""
        return event_type(self.event)

    def with_position(self, position: int) -> EventEnvelope:
        """A copy with the global position the store assigned."""
        return msgspec.structs.replace(self, position=position)


class ReplayedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a stored ``EventEnvelope`` that folding reads, decoded from the same
    bytes: a projection replaying history needs neither the hashes, nor the event id,
    actor or correlation, and skipping them halves the decoding, a replay's largest
    cost. Never published, stored or verified: the chain is checked on full envelopes.
    """

    session_id: uuid.UUID
    version: Annotated[int, msgspec.Meta(ge=1)]
    occurred_at: Timestamp
    event: Event
    position: Annotated[int, msgspec.Meta(ge=1)] | None = None
    schema_version: Annotated[int, msgspec.Meta(ge=1)] = 1
    causation_id: uuid.UUID | None = None

    @property
    def type(self) -> str:
        return event_type(self.event)


class SessionEvent(Protocol):
    """What folding an event needs: an ``EventEnvelope`` or a ``ReplayedEvent``."""

    @property
    def session_id(self) -> uuid.UUID: ...
    @property
    def version(self) -> int: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def event(self) -> Event: ...
    @property
    def position(self) -> int | None: ...
    @property
    def causation_id(self) -> uuid.UUID | None: ...
    @property
    def type(self) -> str: ...
