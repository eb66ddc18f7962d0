"""What every sessionctl command shares: exit codes, the options read from the
settings, one way to run a command over the bus and to open the store, output helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console

import contracts
from coordinator.errors import CoordinatorError
from coordinator.store.eventstore import MAX_PARTITIONS, EventStore
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, StoreUnavailable
from sessionctl import settings
from transport.amqp import AmqpTransport, redact_url
from transport.port import TransportError

AMQP_URL_HELP = "RabbitMQ URL; the nodes of a cluster as several URLs separated by commas"

# Exit codes: 0 done; 1 the answer is "no" (unknown session, failed verification,
# refused command); 2 bad usage; 3 broker unreachable; 4 coordinator not answering or
# failing; 5 the coordinator answers but its event store is unavailable (try again).
EXIT_NO, EXIT_USAGE, EXIT_BROKER, EXIT_COORDINATOR, EXIT_STORE = 1, 2, 3, 4, 5


def fail(message: str, code: int = 1) -> None:
    click.echo(f"sessionctl: {message}", err=True)
    sys.exit(code)


# A long history without a checkpoint is folded by this many processes (``coordinator
# .rebuild``); for the coordinator and for ``replay``.
rebuild_workers_option = settings.option(
    "rebuild_workers",
    "--rebuild-workers",
    type=click.IntRange(1, MAX_PARTITIONS),
    help="Processes that fold a long history without a checkpoint on start.",
)
amqp_url_option = settings.option("amqp_url", "--amqp-url", help=AMQP_URL_HELP)
prefix_option = settings.option("prefix", "--prefix", help="Topology prefix.")
store_option = settings.option("store", "--store", help="Event store URL.")


# --- operations over the bus ---------------------------------------------------------

T = TypeVar("T")


def bus_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds.")(f)
    f = prefix_option(f)
    result: Callable[..., Any] = amqp_url_option(f)
    return result


def topology_for(prefix: str) -> contracts.Topology:
    """The topology of ``prefix`` (a flag's, or the setting's) with the partitions of
    the settings."""
    try:
        return contracts.Topology(prefix, settings.current().partitions)
    except contracts.ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="--prefix") from exc


def run_bus(
    amqp_url: str,
    prefix: str,
    timeout: float,
    action: Callable[[CoordinatorClient, AmqpTransport, contracts.Topology], Awaitable[T]],
) -> T:
    """Connect, run ``action`` with a client, and turn every failure into one line and
    a meaningful exit code."""
    topology = topology_for(prefix)

    async def go() -> T:
        transport = AmqpTransport(amqp_url, connection_name="sessionctl", connect_timeout=timeout)
        quiet = logging.getLogger("aiormq.connection")
        quiet.setLevel(logging.CRITICAL)
        async with transport:
            client = CoordinatorClient(transport, topology, timeout=timeout, attempts=1)
            return await action(client, transport, topology)

    try:
        return asyncio.run(go())
    except CommandFailed as exc:
        fail(f"{exc.error.code}: {exc.error.message}", EXIT_NO)
    except StoreUnavailable as exc:
        fail(f"{exc.error.code}: {exc.error.message}", EXIT_STORE)
    except CoordinatorUnavailable:
        fail(
            f"no reply from a coordinator on prefix {prefix!r} within {timeout:g} s "
            "(is `sessionctl coordinator` running?)",
            EXIT_COORDINATOR,
        )
    except TransportError as exc:
        fail(f"broker at {redact_url(amqp_url)}: {exc}", EXIT_BROKER)
    raise AssertionError("unreachable")  # pragma: no cover


def parse_uuid(value: str, what: str = "SESSION_ID") -> uuid.UUID:
    try:
        return contracts.parse_session_id(value)
    except contracts.ValidationError as exc:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint=what) from exc


def emit_json(value: Any) -> None:
    click.echo(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True))


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value else "-"


# Tables stay readable when piped (rich assumes 80 columns off a terminal).
stdout_console = Console(width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def open_store(url: str) -> Iterator[EventStore]:
    try:
        store = EventStore(url)
    except CoordinatorError as exc:
        fail(f"store {url}: {exc}", EXIT_USAGE)
        raise AssertionError("unreachable") from exc  # pragma: no cover
    try:
        yield store
    finally:
        store.close()


SEED_MODULE_IDS = (
    "ai-context-manager",
    "ai-integration",
    "executor",
    "task-loop",
    "step-processor",
    "executor-streamer",
    "frontend-api",
)
