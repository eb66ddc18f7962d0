"""Names of every exchange, queue and routing key, derived from one prefix.

A prefix (default ``sessionbus``) lets tests and tenants share one broker without
seeing each other's traffic.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from contracts.errors import ValidationError
from contracts.events import EVENT_TYPES, event_type
from contracts.ids import PREFIX_PATTERN, parse_module_id

__all__ = [
    "DEFAULT_AUDIT_RETENTION",
    "DEFAULT_PREFIX",
    "DLQ_HEADERS",
    "HEADERS",
    "MODULE_ROUTING_KEYS",
    "ExchangeSpec",
    "ExchangeType",
    "QueueSpec",
    "Topology",
]

# How long the audit stream keeps events (RabbitMQ x-max-age syntax).
DEFAULT_AUDIT_RETENTION: Final = "30D"
# What a module's queue receives: every session event and orphan clean-up requests.
MODULE_ROUTING_KEYS: Final = ("session.#", "module.orphan-cleanup-requested")
# Most command partitions (each is a quorum queue with one active consumer).
MAX_PARTITIONS: Final = 256
# Redeliveries before a quorum queue dead-letters a message that keeps failing.
DELIVERY_LIMIT: Final = 10
# The dead-letter inbox's limit: a letter goes back to it only when a move to the
# dead-letter stream dies half-way, and must never be dropped for that. Explicit (not
# RabbitMQ 4's default of 20; 3.10 has none) and the same number on every version
# (-1, "unlimited" on 4.x, is not a limit 3.10 reads the same way).
DEAD_LETTER_INBOX_DELIVERY_LIMIT: Final = 1_000_000

DEFAULT_PREFIX: Final = "sessionbus"


ExchangeType = Literal["topic", "fanout", "direct"]


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    durable: bool = True
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue and what it is bound to. ``arguments`` carry ``x-queue-type``,
    dead-lettering and limits exactly as RabbitMQ takes them."""

    name: str
    durable: bool = True
    arguments: Mapping[str, Any] = field(default_factory=dict)
    bindings: Sequence[tuple[str, str]] = ()  # (exchange, routing key)
    exclusive: bool = False
    auto_delete: bool = False


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


class DLQ_HEADERS:  # noqa: N801 - a namespace of constants, as HEADERS
    """Headers of the dead-letter stream's bookkeeping entries (a letter has none of
    them); written and read by operator tools only, never by a module."""

    ENTRY: Final = "x-sessionbus-dlq-entry"  # "cut" or "settled"
    CUT: Final = "x-sessionbus-dlq-cut"  # the id of a read's cut
    SETTLES: Final = "x-sessionbus-dlq-settles"  # the offset of the letter settled
    ACTION: Final = "x-sessionbus-dlq-action"  # "replayed" or "discarded"


@dataclass(frozen=True, slots=True)
class Topology:
    """All broker names for one prefix.

    ``partitions`` splits the commands queue in N queues, ``<prefix>.commands.<i>``: a
    command goes to the partition of its workflow session (commands without one to
    partition 0), so one coordinator at a time owns each session's commands. Clients
    and coordinators must agree on N. With one partition the queue is
    ``<prefix>.commands``.
    """

    prefix: str = DEFAULT_PREFIX
    partitions: int = 1

    def __post_init__(self) -> None:
        if not re.fullmatch(PREFIX_PATTERN, self.prefix):
            raise ValidationError(
                f"topology prefix must match {PREFIX_PATTERN}, got {self.prefix!r}",
                field="prefix",
            )
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValidationError(
                f"partitions must be 1..{MAX_PARTITIONS}, got {self.partitions}",
                field="partitions",
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
    def unroutable_exchange(self) -> str:
        """Alternate exchange of the events exchange: an event no queue is bound for
        lands here instead of being dropped."""
        return f"{self.prefix}.events.unroutable"

    @property
    def unroutable_queue(self) -> str:
        return f"{self.prefix}.unroutable"

    @property
    def dead_letter_exchange(self) -> str:
        """Where rejected messages go, with their reason in headers."""
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        """Inbox of dead letters from every sessionbus queue (a quorum queue bound to
        the dead-letter exchange): the broker dead-letters here, and RabbitMQ 3.10
        cannot dead-letter into a stream. Letters are moved, unchanged, to
        ``dead_letter_stream`` before anyone reads them."""
        return f"{self.prefix}.dlq"

    @property
    def dead_letter_stream(self) -> str:
        """Where dead letters are kept and read: a stream, read without taking anything,
        with replays and discards recorded in it as settlements."""
        return f"{self.prefix}.dead-letters"

    @property
    def audit_stream(self) -> str:
        """Stream queue bound to every event: replayable history for auditors."""
        return f"{self.prefix}.audit"

    def partition_of(self, session_id: uuid.UUID | None) -> int:
        """The partition of a workflow session's commands (0 without a session).

        Client-side hashing on the UUID itself: every client computes the same answer
        with no broker plugin, and a request still goes to one named queue, so direct
        reply-to keeps working."""
        if session_id is None or self.partitions == 1:
            return 0
        return session_id.int % self.partitions

    def command_queue_for(self, session_id: uuid.UUID | None) -> str:
        """Where a command about ``session_id`` goes."""
        if self.partitions == 1:
            return self.commands_queue()
        return self.commands_queue(self.partition_of(session_id))

    def command_queues(self) -> list[str]:
        """Every commands queue (one per partition)."""
        if self.partitions == 1:
            return [self.commands_queue()]
        return [self.commands_queue(p) for p in range(self.partitions)]

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

    def heartbeats_queue_for(self, instance: str) -> str:
        """A coordinator instance's own heartbeat queue (each replica sees them all)."""
        return f"{self.prefix}.heartbeats.{instance}"

    def console_queue_for(self, instance: str) -> str:
        """A web console's own queue of session events for its live pages (exclusive
        to its connection, gone with it)."""
        return f"{self.prefix}.console.{instance}"

    # -- declarations -----------------------------------------------------------------

    def exchange_specs(self) -> list[ExchangeSpec]:
        """Exchanges the coordinator owns, in declaration order."""
        return [
            ExchangeSpec(self.unroutable_exchange, "fanout"),
            ExchangeSpec(self.dead_letter_exchange, "fanout"),
            ExchangeSpec(
                self.events_exchange,
                "topic",
                arguments={"alternate-exchange": self.unroutable_exchange},
            ),
            ExchangeSpec(self.heartbeats_exchange, "fanout"),
        ]

    def _quorum(self, **extra: object) -> dict[str, object]:
        # The limit explicit: RabbitMQ 4 gives a quorum queue without one a limit of
        # 20, 3.10 none.
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-delivery-limit": DELIVERY_LIMIT,
            **extra,
        }

    @staticmethod
    def dead_letter_stream_arguments() -> dict[str, object]:
        """A stream with no retention limit, on purpose (no x-max-age, no
        x-max-length-bytes): a letter stays until an operator replays or discards it
        (a settlement entry records which). Reading a stream takes nothing and counts
        no delivery, so listing never changes a letter on any RabbitMQ version, where
        browsing a quorum queue by requeueing spends its delivery limit (20 by default
        on RabbitMQ 4) and then drops it."""
        return {"x-queue-type": "stream"}

    def commands_queue_spec(self, partition: int | None = None) -> QueueSpec:
        """Commands: quorum, dead-lettered; one owner at a time per partition."""
        return QueueSpec(
            self.commands_queue(partition),
            arguments=self._quorum(**{"x-single-active-consumer": True}),
        )

    def module_queue_spec(self, module_id: str) -> QueueSpec:
        """A module's events: quorum, dead-lettered, single active consumer so one
        replica at a time sees a session's events, in order."""
        return QueueSpec(
            self.module_queue(module_id),
            arguments=self._quorum(**{"x-single-active-consumer": True}),
            bindings=[(self.events_exchange, key) for key in MODULE_ROUTING_KEYS],
        )

    def queue_specs(self, *, audit_retention: str = DEFAULT_AUDIT_RETENTION) -> list[QueueSpec]:
        """Queues the coordinator owns (commands, dead letters, unroutable, audit)."""
        return [
            QueueSpec(
                self.dead_letter_queue,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": DEAD_LETTER_INBOX_DELIVERY_LIMIT,
                },
                bindings=[(self.dead_letter_exchange, "")],
            ),
            QueueSpec(self.dead_letter_stream, arguments=self.dead_letter_stream_arguments()),
            QueueSpec(
                self.unroutable_queue,
                arguments=self._quorum(),
                bindings=[(self.unroutable_exchange, "")],
            ),
            QueueSpec(
                self.audit_stream,
                arguments={"x-queue-type": "stream", "x-max-age": audit_retention},
                bindings=[(self.events_exchange, "#")],
            ),
            *(
                [self.commands_queue_spec()]
                if self.partitions == 1
                else [self.commands_queue_spec(p) for p in range(self.partitions)]
            ),
        ]

    def names(self) -> dict[str, str]:
        """Every fixed name, for display and for cleaning up a prefix."""
        return {
            "events_exchange": self.events_exchange,
            "heartbeats_exchange": self.heartbeats_exchange,
            "dead_letter_exchange": self.dead_letter_exchange,
            "dead_letter_queue": self.dead_letter_queue,
            "dead_letter_stream": self.dead_letter_stream,
            "unroutable_exchange": self.unroutable_exchange,
            "unroutable_queue": self.unroutable_queue,
            "audit_stream": self.audit_stream,
            "commands_queue": self.commands_queue(),
        }
