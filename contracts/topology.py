"""Names of every exchange, queue and routing key, derived from one prefix.

A prefix (default ``sessionbus``) lets tests and tenants share one broker without
seeing each other's traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from contracts.errors import ValidationError
from contracts.events import EVENT_TYPES, event_type
from contracts.ids import PREFIX_PATTERN, parse_module_id

__all__ = ["DEFAULT_PREFIX", "HEADERS", "Topology"]

DEFAULT_PREFIX: Final = "sessionbus"


class HEADERS:
    """AMQP header names carried by every sessionbus message."""

    SCHEMA_VERSION: Final = "x-sessionbus-schema"
    SESSION_ID: Final = "x-session-id"
    VERSION: Final = "x-session-version"
    POSITION: Final = "x-position"
    TRACEPARENT: Final = "traceparent"
    TRACESTATE: Final = "tracestate"
    REJECT_REASON: Final = "x-sessionbus-reject-reason"
    REJECT_CODE: Final = "x-sessionbus-reject-code"
    REJECT_FIELD: Final = "x-sessionbus-reject-field"
    REJECTED_BY: Final = "x-sessionbus-rejected-by"


@dataclass(frozen=True, slots=True)
class Topology:
    """All broker names for one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not re.fullmatch(PREFIX_PATTERN, self.prefix):
            raise ValidationError(
                f"topology prefix must match {PREFIX_PATTERN}, got {self.prefix!r}",
                field="prefix",
            )

    @property
    def events_exchange(self) -> str:
        """Topic exchange every event is published to, keyed by event type."""
        return f"{self.prefix}.events"

    @property
    def heartbeats_exchange(self) -> str:
        """Fanout exchange for module heartbeats (not event-sourced)."""
        return f"{self.prefix}.heartbeats"

    @property
    def heartbeats_queue(self) -> str:
        """The coordinator's heartbeat queue."""
        return f"{self.prefix}.heartbeats.coordinator"

    @property
    def dead_letter_exchange(self) -> str:
        """Where rejected messages go, with their reason in headers."""
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        """Dead letters from every sessionbus queue."""
        return f"{self.prefix}.dlq"

    @property
    def audit_stream(self) -> str:
        """Stream queue bound to every event: replayable history for auditors."""
        return f"{self.prefix}.audit"

    def commands_queue(self, partition: int | None = None) -> str:
        """The commands queue, or one partition of it."""
        base = f"{self.prefix}.commands"
        return base if partition is None else f"{base}.{partition}"

    def module_queue(self, module_id: str) -> str:
        """A module's own queue of events."""
        return f"{self.prefix}.module.{parse_module_id(module_id)}"

    @staticmethod
    def routing_key(event_type_tag: str) -> str:
        """Routing key of an event type on the events exchange: its wire tag."""
        return event_type_tag

    @staticmethod
    def all_routing_keys() -> tuple[str, ...]:
        """Every event routing key."""
        return tuple(event_type(cls) for cls in EVENT_TYPES)

    def names(self) -> dict[str, str]:
        """Every fixed name, for display and for cleaning up a prefix."""
        return {
            "events_exchange": self.events_exchange,
            "heartbeats_exchange": self.heartbeats_exchange,
            "heartbeats_queue": self.heartbeats_queue,
            "dead_letter_exchange": self.dead_letter_exchange,
            "dead_letter_queue": self.dead_letter_queue,
            "audit_stream": self.audit_stream,
            "commands_queue": self.commands_queue(),
        }
