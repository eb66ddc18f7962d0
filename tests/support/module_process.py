"""A module as an OS process of its own, for the end-to-end tests.

    python -m tests.support.module_process --module-id executor --prefix P \\
        --url amqp://… --out executor.json [--connection-name NAME]

Runs a ``SessionManager`` subclass for the module id on RabbitMQ under the topology
prefix, records every (session, version) it applies (``consumer.stats.record_versions``)
and prints ``ready`` once it consumes. On SIGTERM or SIGINT it closes gracefully, writes
what it applied to ``--out`` as JSON and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from contracts import ModuleSessionConfig, ModuleSessionInfo, Topology, WorkflowSession
from module_sdk import SessionManager
from transport.amqp import AmqpTransport

log = logging.getLogger("sessionbus.tests.module_process")


class ProcessModule(SessionManager):
    """Makes and destroys nothing real; counts what its hooks were asked to do."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.made: list[str] = []
        self.destroyed: list[str] = []
        self.consumer.stats.record_versions = True

    async def on_create(
        self, session: WorkflowSession, module_session_id: uuid.UUID, config: ModuleSessionConfig
    ) -> dict[str, Any]:
        self.made.append(str(module_session_id))
        return {"pid": os.getpid()}

    async def on_destroy(self, info: ModuleSessionInfo) -> None:
        self.destroyed.append(str(info.session_id))


def report(manager: ProcessModule) -> dict[str, Any]:
    stats = manager.consumer.stats
    return {
        "module_id": manager.module_id,
        "versions": {str(sid): versions for sid, versions in stats.versions.items()},
        "received": stats.received,
        "applied": stats.applied,
        "duplicates": stats.duplicates,
        "gaps_filled": stats.gaps_filled,
        "dead_lettered": stats.dead_lettered,
        "requeued": stats.requeued,
        "made": manager.made,
        "destroyed": manager.destroyed,
    }


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    manager = ProcessModule(
        AmqpTransport(args.url, connection_name=args.connection_name or f"module {args.module_id}"),
        module_id=args.module_id,
        topology=Topology(args.prefix),
        own_transport=True,
        heartbeat_interval=1.0,
    )
    async with manager:
        sys.stdout.write("ready\n")  # the parent waits for this line
        sys.stdout.flush()
        await manager.run_until(stop)
    out = Path(args.out)
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(report(manager)))
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-id", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--connection-name", default=None)
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
