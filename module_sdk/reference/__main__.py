"""Run one reference module as its own process: ``python -m module_sdk.reference NAME``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from contracts import DEFAULT_PREFIX, Topology
from contracts.amqp import AmqpTransport
from contracts.logs import configure_logging
from contracts.transport import TransportError
from module_sdk.reference import MODULES


async def _run(name: str, url: str, prefix: str) -> None:
    cls = MODULES[name]
    transport = AmqpTransport(url, connection_name=f"sessionbus-module-{name}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with cls(transport, topology=Topology(prefix), own_transport=True) as module:
        print(f"{name}: ready on prefix {prefix!r}", file=sys.stderr, flush=True)
        await module.run_until(stop)
    print(
        f"{name}: stopped; created {module.created_total} sessions, cleaned up {module.destroyed}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m module_sdk.reference")
    parser.add_argument("name", choices=sorted(MODULES))
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("SESSIONBUS_AMQP_URL", "amqp://guest:guest@localhost:5672/"),
    )
    parser.add_argument("--prefix", default=os.environ.get("SESSIONBUS_PREFIX", DEFAULT_PREFIX))
    parser.add_argument("--log-level", default=os.environ.get("SESSIONBUS_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level, os.environ.get("SESSIONBUS_LOG_FORMAT", "text"))
    try:
        asyncio.run(_run(args.name, args.amqp_url, args.prefix))
    except TransportError as exc:
        print(f"{args.name}: broker error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
