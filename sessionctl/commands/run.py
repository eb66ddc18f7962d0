"""Commands that run a service: the coordinator, the demo, one reference module."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

import click
from rich.console import Console

import contracts
from coordinator.domain.identity import IdentityMap
from coordinator.errors import CoordinatorError
from coordinator.errors import StoreUnavailable as StoreDown
from coordinator.service.runtime import CoordinatorRuntime
from reference_modules.__main__ import main as run_module
from sessionctl import settings
from sessionctl.commands.common import (
    EXIT_STORE,
    SEED_MODULE_IDS,
    amqp_url_option,
    fail,
    prefix_option,
    rebuild_workers_option,
    store_option,
)
from sessionctl.demo import DemoOptions, run_demo, summary_table
from transport.amqp import AmqpTransport, redact_url
from transport.port import TransportError


def _replica(value: str | None) -> tuple[int, int] | None:
    """``I/N``, or ``hostname/N``: the ordinal a StatefulSet puts at the end of the pod
    name (``sessionbus-coordinator-2`` is replica 2)."""
    if not value:
        return None
    index, sep, count = value.partition("/")
    if index == "hostname":
        index = socket.gethostname().rsplit("-", 1)[-1]
    try:
        parsed = (int(index), int(count))
    except ValueError:
        parsed = (-1, 0)
    if not sep or not 0 <= parsed[0] < parsed[1]:
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N", param_hint="--replica")
    return parsed


@click.command()
@amqp_url_option
@store_option
@prefix_option
@settings.option("identity", "--identity", help="user=module[,…];user=*")
@settings.option(
    "audit_retention", "--audit-retention", help="How long the audit stream keeps events."
)
@settings.option(
    "partitions",
    "--partitions",
    type=click.IntRange(1, contracts.topology.MAX_PARTITIONS),
    help="Command partitions (the same on every coordinator and client).",
)
@settings.option(
    "replica",
    "--replica",
    help="I/N (or hostname/N in a StatefulSet): this is replica I of N; it takes the "
    "partitions p % N == I first.",
)
@settings.option(
    "metrics_port",
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus /metrics on this port (0: any free port).",
)
@settings.option(
    "console_port",
    "--console-port",
    type=click.IntRange(0, 65535),
    help="Serve the web console beside the coordinator on this port (0: any free port).",
)
@settings.option("console_host", "--console-host", help="Address the console listens on.")
@rebuild_workers_option
def coordinator(
    amqp_url: str,
    store: str,
    prefix: str,
    identity: str | None,
    audit_retention: str,
    partitions: int,
    replica: str | None,
    metrics_port: int | None,
    console_port: int | None,
    console_host: str,
    rebuild_workers: int | None,
) -> None:
    """Run the coordinator service until SIGTERM or SIGINT."""
    try:
        topology = contracts.Topology(prefix, partitions)
        replica_of = _replica(replica)
        transport = AmqpTransport(
            amqp_url, connection_name=settings.current().coordinator_connection_name()
        )
        idmap = IdentityMap.from_setting(identity, transport.user)
    except (contracts.ContractsError, CoordinatorError) as exc:
        fail(str(exc), 2)
        return
    try:
        asyncio.run(
            _serve(
                transport,
                store,
                topology,
                idmap,
                audit_retention,
                metrics_port,
                replica_of,
                rebuild_workers,
                console=(console_host, console_port) if console_port is not None else None,
                amqp_url=amqp_url,
            )
        )
    except TransportError as exc:
        fail(f"broker at {redact_url(amqp_url)}: {exc}", 3)
    except StoreDown as exc:  # unreachable, or held by another coordinator
        fail(str(exc), EXIT_STORE)
    except CoordinatorError as exc:
        fail(str(exc), 4)


async def _serve(
    transport: AmqpTransport,
    store: str,
    topology: contracts.Topology,
    identity: IdentityMap,
    audit_retention: str,
    metrics_port: int | None,
    replica: tuple[int, int] | None = None,
    rebuild_workers: int | None = None,
    *,
    console: tuple[str, int] | None = None,
    amqp_url: str | None = None,
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
        metrics_port=metrics_port,
        replica=replica,
        rebuild_workers=rebuild_workers,
    )
    async with runtime, contextlib.AsyncExitStack() as stack:
        served = ""
        if console is not None:
            # The web stack is loaded only where a console is served.
            from sessionctl.console import ConsoleServer, ConsoleSettings  # noqa: PLC0415

            console_settings = ConsoleSettings(
                amqp_url=amqp_url or transport.url,
                topology=topology,
                secret=console_secret(),
                feed_transport=transport,
            )
            server = await stack.enter_async_context(ConsoleServer(console_settings, *console))
            served = f", console on {server.url}/"
        click.echo(
            f"sessionbus coordinator: store {store}, broker {redact_url(transport.url)}, "
            f"prefix {topology.prefix!r}"
            + (f", metrics on :{runtime.metrics_port}/metrics" if metrics_port is not None else "")
            + served
            + "; ready",
            err=True,
        )
        await runtime.serve_forever(stop)
    click.echo("sessionbus coordinator: stopped", err=True)


def console_secret() -> bytes | None:
    """What signs the console's cookies (a random secret per process when unset)."""
    text = settings.current().console_secret
    return text.encode() if text else None


@click.command()
@amqp_url_option
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
        fail(f"broker at {redact_url(amqp_url)}: {exc}", 3)
        return
    console.print(summary_table(result))
    if result.errors or result.chains_bad:
        for line in result.errors[:10]:
            console.print(f"[red]{line}[/]")
        sys.exit(1)


@click.command("module")
@click.argument("name", type=click.Choice(sorted(SEED_MODULE_IDS)))
@amqp_url_option
@prefix_option
def module_command(name: str, amqp_url: str, prefix: str) -> None:
    """Run one of the seven reference modules until SIGTERM or SIGINT."""
    sys.exit(run_module([name, "--amqp-url", amqp_url, "--prefix", prefix]))
