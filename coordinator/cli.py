"""``sessionctl``: the command line of sessionbus."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import click

import contracts
from contracts import schema as schema_mod
from contracts.amqp import AmqpTransport, redact_url
from contracts.transport import TransportError
from coordinator.errors import CoordinatorError
from coordinator.identity import IdentityMap
from coordinator.runtime import CoordinatorRuntime
from coordinator.store import DEFAULT_STORE_URL

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"sessionctl: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sessionbus")
@click.option(
    "--log-level", default=os.environ.get("SESSIONBUS_LOG_LEVEL", "INFO"), show_default=True
)
def main(log_level: str) -> None:
    """Session lifecycle coordination over RabbitMQ."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--asyncapi", "kind", flag_value="asyncapi", default=True, help="AsyncAPI 3.0.")
@click.option("--jsonschema", "kind", flag_value="jsonschema", help="JSON Schema of every message.")
@click.option("--prefix", default=contracts.DEFAULT_PREFIX, show_default=True)
def schema(kind: str, prefix: str) -> None:
    """Print the wire schema generated from the contracts."""
    doc = schema_mod.asyncapi(prefix) if kind == "asyncapi" else schema_mod.json_schema()
    sys.stdout.write(schema_mod.dumps(doc))


@main.command()
@click.option(
    "--amqp-url", envvar="SESSIONBUS_AMQP_URL", default=DEFAULT_AMQP_URL, show_default=True
)
@click.option("--store", envvar="SESSIONBUS_STORE", default=DEFAULT_STORE_URL, show_default=True)
@click.option(
    "--prefix", envvar="SESSIONBUS_PREFIX", default=contracts.DEFAULT_PREFIX, show_default=True
)
@click.option(
    "--identity", envvar="SESSIONBUS_IDENTITY", default=None, help="user=module[,…];user=*"
)
@click.option(
    "--audit-retention", envvar="SESSIONBUS_AUDIT_RETENTION", default="30D", show_default=True
)
def coordinator(
    amqp_url: str, store: str, prefix: str, identity: str | None, audit_retention: str
) -> None:
    """Run the coordinator service until SIGTERM or SIGINT."""
    try:
        topology = contracts.Topology(prefix)
        transport = AmqpTransport(amqp_url, connection_name="sessionbus-coordinator")
        idmap = IdentityMap.parse(identity) if identity else IdentityMap.from_env(transport.user)
    except (contracts.ContractsError, CoordinatorError) as exc:
        _fail(str(exc), 2)
        return
    try:
        asyncio.run(_serve(transport, store, topology, idmap, audit_retention))
    except TransportError as exc:
        _fail(f"broker at {redact_url(amqp_url)}: {exc}", 3)
    except CoordinatorError as exc:
        _fail(str(exc), 4)


async def _serve(
    transport: AmqpTransport,
    store: str,
    topology: contracts.Topology,
    identity: IdentityMap,
    audit_retention: str,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = CoordinatorRuntime(
        transport,
        store=store,
        topology=topology,
        identity=identity,
        audit_retention=audit_retention,
    )
    async with runtime:
        click.echo(
            f"sessionbus coordinator: store {store}, broker {redact_url(transport.url)}, "
            f"prefix {topology.prefix!r}; ready",
            err=True,
        )
        await runtime.serve_forever(stop)
    click.echo("sessionbus coordinator: stopped", err=True)


@main.command()
@click.option(
    "--amqp-url", envvar="SESSIONBUS_AMQP_URL", default=DEFAULT_AMQP_URL, show_default=True
)
@click.option(
    "--broker",
    type=click.Choice(["auto", "rabbitmq", "memory"]),
    default="auto",
    show_default=True,
    help="auto: RabbitMQ if reachable, else the in-process bus.",
)
@click.option("--sessions", default=40, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 1000))
@click.option("--store", default=None, help="Event store URL (default: a temporary SQLite file).")
@click.option("--keep-running", is_flag=True, help="Keep everything running after the sessions.")
@click.option("--seed", type=int, default=None, help="Random seed for the sample sessions.")
def demo(
    amqp_url: str,
    broker: str,
    sessions: int,
    concurrency: int,
    store: str | None,
    keep_running: bool,
    seed: int | None,
) -> None:
    """Coordinator + the seven reference modules + sample workflow sessions, end to end."""
    from rich.console import Console

    from coordinator.demo import DemoOptions, run_demo, summary_table

    console = Console()
    options = DemoOptions(
        amqp_url=amqp_url,
        broker=broker,
        sessions=sessions,
        concurrency=concurrency,
        store=store,
        keep_running=keep_running,
        seed=seed,
    )
    try:
        result = asyncio.run(run_demo(options, console))
    except TransportError as exc:
        _fail(f"broker at {redact_url(amqp_url)}: {exc}", 3)
        return
    console.print(summary_table(result))
    if result.errors or result.chains_bad:
        for line in result.errors[:10]:
            console.print(f"[red]{line}[/]")
        sys.exit(1)
