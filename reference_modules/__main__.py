"""Run one reference module as its own process: ``python -m reference_modules NAME``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import uvicorn

from module_sdk.logs import configure_logging
from reference_modules import MODULES
from reference_modules.http import FrontendApp
from reference_modules.settings import ReferenceModuleSettings
from transport.amqp import AmqpTransport
from transport.port import TransportError
from transport.settings import SettingsError


async def _run(name: str, settings: ReferenceModuleSettings) -> None:
    cls = MODULES[name]
    transport = AmqpTransport(
        settings.amqp_url, connection_name=settings.connection_name or f"sessionbus-module-{name}"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    topology = settings.topology()
    prefix, http_host, http_port = settings.prefix, settings.http_host, settings.http_port
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
    # Flags left out (None) fall back to the environment, then to the defaults.
    parser.add_argument("--amqp-url", help=_help("amqp_url"))
    parser.add_argument("--prefix", help=_help("prefix"))
    parser.add_argument("--http-port", type=int, help=_help("http_port"))
    parser.add_argument("--http-host", help=_help("http_host"))
    parser.add_argument("--log-level", help=_help("log_level"))
    args = parser.parse_args(argv)
    try:
        settings = ReferenceModuleSettings.from_env(
            amqp_url=args.amqp_url,
            prefix=args.prefix,
            http_port=args.http_port,
            http_host=args.http_host,
            log_level=args.log_level,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    try:
        if settings.http_port is not None and args.name != "frontend-api":
            parser.error("--http-port is for frontend-api")
        asyncio.run(_run(args.name, settings))
    except TransportError as exc:
        print(f"{args.name}: broker error: {exc}", file=sys.stderr)
        return 3
    return 0


def _help(name: str) -> str:
    variable = dict(ReferenceModuleSettings.variables())[name]
    return f"{variable.meaning.replace('%', '%%')} [env var: {variable.name}]"


if __name__ == "__main__":
    sys.exit(main())
