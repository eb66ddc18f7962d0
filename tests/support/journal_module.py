"""A module that journals what it applies, in process or as an OS process of its own.

    python -m tests.support.journal_module --module-id executor --prefix P \\
        --url amqp://… --journal executor.jsonl [--optional]

Every (session, version) the module applies (with the event's id), every registry
event it applies, every version it knew from the coordinator when it started (its
catch-up baseline), every module session its hooks made or destroyed and every link it
sent (with the coordinator's answer) is one JSON line, written to the journal as it happens with one
``write`` on an ``O_APPEND`` descriptor: the lines are in the kernel once the call
returns, so a SIGKILL loses none of them. A process appends to the same journal on
each start, so the journal is the history of every incarnation of the module; SIGTERM
closes gracefully and writes a ``stop`` line with the consumer's figures.

Lines: ``{"k": "start", "pid": …, "t": …}``, ``{"k": "baseline", "v": {sid: version}}``,
``{"k": "a", "s": sid, "v": version, "e": event_id, "t": …}`` (applied), ``{"k": "r",
"e": event_id}`` (a registry event applied), ``{"k": "made", "w": wsid, "m": msid,
"wt": …}`` (``on_create``), ``{"k": "destroyed", "w": wsid, "m": msid, "wt": …}``
(``on_destroy``), ``{"k": "link", "w": wsid, "m": msid, "wt": …, "r": "ok" | code, "kv": version}``
(``kv``: the session's version the module held when it sent the link),
``{"k": "ready", "t": …}``, ``{"k": "stop", "stats": {…}}``. ``t`` is
``time.monotonic()``: one clock for every process of the machine, so a test can compare
it with its own; ``wt`` is ``time.time()``, the clock the coordinator stamps events
with, so the checker can tell a hook called after its session was destroyed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contracts import (
    REGISTRY_ID,
    Accepted,
    EventEnvelope,
    ModuleSessionConfig,
    ModuleSessionInfo,
    WorkflowSession,
)
from module_sdk import CommandFailed, CoordinatorClient, SessionManager
from tests.support.checker import HookCall, Incarnation
from transport.amqp import AmqpTransport
from transport.settings import Settings

__all__ = ["Journal", "JournalModule", "incarnation"]

log = logging.getLogger("sessionbus.tests.journal_module")


class Journal:
    """Append-only JSON lines; in memory too (``records``) for in-process modules."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._fd = (
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if path is not None
            else None
        )

    def write(self, kind: str, **fields: Any) -> None:
        record = {"k": kind, **fields}
        self.records.append(record)
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# The journal line of each kind of hook call (``made`` and ``destroyed`` predate ``link``).
_LINES = {"create": "made", "destroy": "destroyed", "link": "link"}


class _LinkJournal(CoordinatorClient):
    """The module's client, journaling every link it sends and the answer."""

    def __init__(self, client: CoordinatorClient, module: JournalModule) -> None:
        super().__init__(
            client.transport,
            client.topology,
            timeout=client.timeout,
            attempts=client.attempts,
            codec=client.codec,
        )
        self._module = module

    async def link_module_session(
        self,
        workflow_session_id: uuid.UUID,
        module_id: str,
        module_session_id: uuid.UUID,
        **options: Any,
    ) -> Accepted:
        wall = time.time()
        # The version of the session this module held when it sent the link: whether it
        # could have known the session was over (a refusal by a race is not spurious).
        held = self._module.sessions.get(workflow_session_id)
        known = held.version if held is not None else 0
        try:
            accepted = await super().link_module_session(
                workflow_session_id, module_id, module_session_id, **options
            )
        except CommandFailed as exc:
            self._module.hook(
                "link", workflow_session_id, module_session_id, wall, str(exc.code), known
            )
            raise
        self._module.hook("link", workflow_session_id, module_session_id, wall, "ok", known)
        return accepted


class JournalModule(SessionManager):
    """A module whose hooks make and destroy nothing real, and which journals every
    event it applies (through the SDK's apply path: after the event's reaction ran,
    before the delivery is acked) and everything its hooks were asked to do."""

    def __init__(self, *args: Any, journal: Journal | None = None, **options: Any) -> None:
        super().__init__(*args, **options)
        self.client = _LinkJournal(self.client, self)
        self.journal = journal or Journal()
        self.baseline: dict[uuid.UUID, int] = {}
        self.applied: list[tuple[uuid.UUID, int, float]] = []
        self.event_ids: list[uuid.UUID] = []  # parallel to ``applied``
        self.registry: list[uuid.UUID] = []
        self.made: list[tuple[uuid.UUID, uuid.UUID]] = []  # (workflow, module session)
        self.destroyed: list[uuid.UUID] = []
        self.hooks: list[HookCall] = []
        self.journal.write("start", pid=os.getpid(), t=time.monotonic(), module=self.module_id)

    def hook(
        self,
        kind: str,
        workflow_session_id: uuid.UUID,
        module_session_id: uuid.UUID,
        wall: float,
        outcome: str | None = None,
        known_version: int | None = None,
    ) -> None:
        self.hooks.append(
            HookCall(
                kind,
                workflow_session_id,
                module_session_id,
                wall=wall,
                outcome=outcome,
                known_version=known_version,
            )
        )
        fields: dict[str, Any] = {"w": str(workflow_session_id), "m": str(module_session_id)}
        if outcome is not None:
            fields["r"] = outcome
        if known_version is not None:
            fields["kv"] = known_version
        self.journal.write(_LINES[kind], **fields, wt=wall)

    async def on_create(
        self, session: WorkflowSession, module_session_id: uuid.UUID, config: ModuleSessionConfig
    ) -> dict[str, Any]:
        self.made.append((session.session_id, module_session_id))
        self.hook("create", session.session_id, module_session_id, time.time())
        return {"pid": os.getpid()}

    async def on_destroy(self, info: ModuleSessionInfo) -> None:
        self.destroyed.append(info.session_id)
        self.hook("destroy", info.linked_workflow_session_id, info.session_id, time.time())

    async def _catch_up(self) -> None:
        await super()._catch_up()
        # What the coordinator told this incarnation before it consumed anything: the
        # events up to these versions are in its state without being applied one by one.
        self.baseline = {sid: s.version for sid, s in self.sessions.items()}
        self.journal.write("baseline", v={str(k): v for k, v in self.baseline.items()})

    async def _apply(self, env: EventEnvelope) -> None:
        await super()._apply(env)
        self._journal_applied(env)

    async def _apply_history(self, events: Sequence[EventEnvelope]) -> None:
        await super()._apply_history(events)
        for env in events:
            self._journal_applied(env)

    def _journal_applied(self, env: EventEnvelope) -> None:
        if env.session_id == REGISTRY_ID:
            self.registry.append(env.event_id)
            self.journal.write("r", e=str(env.event_id))
            return
        now = time.monotonic()
        self.applied.append((env.session_id, env.version, now))
        self.event_ids.append(env.event_id)
        self.journal.write("a", s=str(env.session_id), v=env.version, e=str(env.event_id), t=now)


def incarnation(module: JournalModule, *, crashed: bool = False) -> Incarnation:
    """What an in-process module applied, as the checker's ``Incarnation``."""
    return Incarnation(
        applied=[(sid, version) for sid, version, _ in module.applied],
        baseline=dict(module.baseline),
        crashed=crashed,
        made=list(module.made),
        destroyed=list(module.destroyed),
        times=[t for _, _, t in module.applied],
        event_ids=list(module.event_ids),
        registry=list(module.registry),
        hooks=list(module.hooks),
    )


def stats_of(module: JournalModule) -> dict[str, Any]:
    stats = module.consumer.stats
    return {
        "received": stats.received,
        "applied": stats.applied,
        "duplicates": stats.duplicates,
        "gaps_filled": stats.gaps_filled,
        "dead_lettered": stats.dead_lettered,
        "requeued": stats.requeued,
    }


class _Optional(JournalModule):
    required = False


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    journal = Journal(Path(args.journal))
    cls = _Optional if args.optional else JournalModule
    # SESSIONBUS_PARTITIONS as the coordinators have it (tests with replicas).
    settings = Settings.from_env(amqp_url=args.url, prefix=args.prefix)
    module = cls(
        AmqpTransport(
            settings.amqp_url,
            connection_name=settings.connection_name or f"module {args.module_id}",
        ),
        module_id=args.module_id,
        topology=settings.topology(),
        own_transport=True,
        heartbeat_interval=1.0,
        client_timeout=3.0,
        journal=journal,
    )
    async with module:
        journal.write("ready", t=time.monotonic())
        sys.stdout.write("ready\n")  # the parent waits for this line
        sys.stdout.flush()
        await module.run_until(stop)
    journal.write("stop", stats=stats_of(module), t=time.monotonic())
    journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-id", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--optional", action="store_true", help="register as not required")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SESSIONBUS_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s {args.module_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
