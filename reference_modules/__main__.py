"""Run one reference module as its own process: ``python -m reference_modules NAME``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import uvicorn

from contracts import DEFAULT_PREFIX, Topology
from module_sdk.logs import configure_logging
from reference_modules import MODULES
from reference_modules.http import FrontendApp
from transport.amqp import AmqpTransport
from transport.port import TransportError


async def _run(
    name: str, url: str, prefix: str, http_port: int | None = None, http_host: str = "127.0.0.1"
) -> None:
    cls = MODULES[name]
    transport = AmqpTransport(
        url,
        connection_name=os.environ.get("SESSIONBUS_CONNECTION_NAME", f"sessionbus-module-{name}"),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    topology = Topology.from_env(prefix)
    async with cls(transport, topology=topology, own_transport=True) as module:
        http = await _serve_http(module, http_host, http_port) if http_port is not None else None
        print(f"{name}: ready on prefix {prefix!r}", file=sys.stderr, flush=True)
        await module.run_until(stop)
        if http is not None:
            server, task = http
            server.should_exit = True
            await task
    print(
        f"{name}: stopped; created {module.created_total} sessions, cleaned up {module.destroyed}",
        file=sys.stderr,
        flush=True,
    )


async def _serve_http(module: Any, host: str, port: int) -> tuple[Any, asyncio.Task[None]]:
    """frontend-api's HTTP face on ``host:port``."""
    config = uvicorn.Config(
        FrontendApp(module.client), host=host, port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    print(f"frontend-api: HTTP on http://{host}:{port}", file=sys.stderr, flush=True)
    return server, task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_modules")
    parser.add_argument("name", choices=sorted(MODULES))
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("SESSIONBUS_AMQP_URL", "amqp://guest:guest@localhost:5672/"),
    )
    parser.add_argument("--prefix", default=os.environ.get("SESSIONBUS_PREFIX", DEFAULT_PREFIX))
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(os.environ["SESSIONBUS_HTTP_PORT"])
        if "SESSIONBUS_HTTP_PORT" in os.environ
        else None,
        help="frontend-api only: serve its HTTP API on this port",
    )
    parser.add_argument("--http-host", default=os.environ.get("SESSIONBUS_HTTP_HOST", "127.0.0.1"))
    parser.add_argument("--log-level", default=os.environ.get("SESSIONBUS_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level, os.environ.get("SESSIONBUS_LOG_FORMAT", "text"))
    try:
        if args.http_port is not None and args.name != "frontend-api":
            parser.error("--http-port is for frontend-api")
        asyncio.run(_run(args.name, args.amqp_url, args.prefix, args.http_port, args.http_host))
    except TransportError as exc:
        print(f"{args.name}: broker error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
