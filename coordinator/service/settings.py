"""The coordinator's settings: the bus settings plus what only the coordinator reads.

Read once, where the coordinator process starts (``sessionctl coordinator``, or a
``CoordinatorRuntime`` given none), and handed down: the store, the identity map and
the rebuild take their values as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from contracts.topology import DEFAULT_AUDIT_RETENTION
from coordinator.domain.identity import IdentityMap
from coordinator.store.eventstore import DEFAULT_STORE_URL, MAX_PARTITIONS
from transport.settings import Settings, setting

__all__ = ["DEFAULT_CONNECTION_NAME", "CoordinatorSettings"]

DEFAULT_CONNECTION_NAME = "sessionbus-coordinator"

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
RebuildWorkers = Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTITIONS)]


@dataclass(frozen=True, kw_only=True)
class CoordinatorSettings(Settings):
    """What a coordinator process is told, beyond the bus settings."""

    store: str = setting(
        "SESSIONBUS_STORE",
        DEFAULT_STORE_URL,
        "event store: `sqlite:///path`, `postgresql://user@host/db?schema=s`, `memory://`",
    )
    identity: str | None = setting(
        "SESSIONBUS_IDENTITY",
        None,
        "broker user → module ids it may act for: `executor=executor;ops=*`",
        shown="development mode: the connecting user may act for every module (logged as such)",
    )
    audit_retention: str = setting(
        "SESSIONBUS_AUDIT_RETENTION",
        DEFAULT_AUDIT_RETENTION,
        "how long the audit stream keeps events (RabbitMQ `x-max-age`: `30D`, `12h` …)",
    )
    replica: str | None = setting(
        "SESSIONBUS_REPLICA",
        None,
        "`I/N` (or `hostname/N` in a StatefulSet): this coordinator is replica I of N and "
        "takes the partitions p % N == I first",
        shown="one coordinator, every partition",
    )
    metrics_port: Port | None = setting(
        "SESSIONBUS_METRICS_PORT",
        None,
        "coordinator's Prometheus `/metrics` port (0: any free port)",
        shown="off",
        expected="a port number from 0 to 65535",
    )
    rebuild_workers: RebuildWorkers | None = setting(
        "SESSIONBUS_REBUILD_WORKERS",
        None,
        "processes that fold a history of 200k events or more on a start without a "
        "checkpoint (`--rebuild-workers`; 1: this process alone)",
        shown="one per core, at most 4",
        expected=f"a whole number from 1 to {MAX_PARTITIONS}",
    )

    def identity_map(self, default_user: str) -> IdentityMap:
        """The identity map these settings write out; none: development mode for
        ``default_user`` (the broker user the coordinator connects as)."""
        return IdentityMap.from_setting(self.identity, default_user)

    def coordinator_connection_name(self) -> str:
        return self.connection_name or DEFAULT_CONNECTION_NAME
