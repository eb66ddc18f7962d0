"""``sessionctl``: the command line of sessionbus."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.tree import Tree

import contracts
from contracts import schema as schema_mod
from coordinator.domain.identity import IdentityMap
from coordinator.errors import CoordinatorError
from coordinator.errors import StoreUnavailable as StoreDown
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.runtime import CoordinatorRuntime
from coordinator.store.eventstore import MAX_PARTITIONS, EventStore
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, StoreUnavailable
from module_sdk.logs import configure_logging
from reference_modules.__main__ import main as run_module
from sessionctl import admin, settings
from sessionctl.definitions import SEED_MODULES, definitions
from sessionctl.demo import DemoOptions, run_demo, summary_table
from transport.amqp import AmqpTransport, redact_url
from transport.audit import read_audit_stream
from transport.port import TransportError
from transport.settings import SettingsError

AMQP_URL_HELP = "RabbitMQ URL; the nodes of a cluster as several URLs separated by commas"

# Exit codes: 0 done; 1 the answer is "no" (unknown session, failed verification,
# refused command); 2 bad usage; 3 broker unreachable; 4 coordinator not answering or
# failing; 5 the coordinator answers but its event store is unavailable (try again).
EXIT_NO, EXIT_USAGE, EXIT_BROKER, EXIT_COORDINATOR, EXIT_STORE = 1, 2, 3, 4, 5


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


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"sessionctl: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sessionbus")
@settings.option("log_level", "--log-level", help="Log level.")
@settings.option(
    "log_format", "--log-format", type=click.Choice(["text", "json"]), help="Log lines."
)
def main(log_level: str, log_format: str) -> None:
    """Session lifecycle coordination over RabbitMQ."""
    configure_logging(log_level, log_format)


@main.command()
@click.option("--asyncapi", "kind", flag_value="asyncapi", default=True, help="AsyncAPI 3.0.")
@click.option("--jsonschema", "kind", flag_value="jsonschema", help="JSON Schema of every message.")
@click.option("--prefix", default=contracts.DEFAULT_PREFIX, show_default=True)
def schema(kind: str, prefix: str) -> None:
    """Print the wire schema generated from the contracts."""
    doc = schema_mod.asyncapi(prefix) if kind == "asyncapi" else schema_mod.json_schema()
    sys.stdout.write(schema_mod.dumps(doc))


# A long history without a checkpoint is folded by this many processes (``coordinator
# .rebuild``); for the coordinator and for ``replay``.
_rebuild_workers = settings.option(
    "rebuild_workers",
    "--rebuild-workers",
    type=click.IntRange(1, MAX_PARTITIONS),
    help="Processes that fold a long history without a checkpoint on start.",
)
_amqp_url = settings.option("amqp_url", "--amqp-url", help=AMQP_URL_HELP)
_prefix = settings.option("prefix", "--prefix", help="Topology prefix.")
_store = settings.option("store", "--store", help="Event store URL.")


@main.command()
@_amqp_url
@_store
@_prefix
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
@_rebuild_workers
def coordinator(
    amqp_url: str,
    store: str,
    prefix: str,
    identity: str | None,
    audit_retention: str,
    partitions: int,
    replica: str | None,
    metrics_port: int | None,
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
        _fail(str(exc), 2)
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
            )
        )
    except TransportError as exc:
        _fail(f"broker at {redact_url(amqp_url)}: {exc}", 3)
    except StoreDown as exc:  # unreachable, or held by another coordinator
        _fail(str(exc), EXIT_STORE)
    except CoordinatorError as exc:
        _fail(str(exc), 4)


async def _serve(
    transport: AmqpTransport,
    store: str,
    topology: contracts.Topology,
    identity: IdentityMap,
    audit_retention: str,
    metrics_port: int | None,
    replica: tuple[int, int] | None = None,
    rebuild_workers: int | None = None,
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
    async with runtime:
        click.echo(
            f"sessionbus coordinator: store {store}, broker {redact_url(transport.url)}, "
            f"prefix {topology.prefix!r}"
            + (f", metrics on :{runtime.metrics_port}/metrics" if metrics_port is not None else "")
            + "; ready",
            err=True,
        )
        await runtime.serve_forever(stop)
    click.echo("sessionbus coordinator: stopped", err=True)


@main.command()
@_amqp_url
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
        _fail(f"broker at {redact_url(amqp_url)}: {exc}", 3)
        return
    console.print(summary_table(result))
    if result.errors or result.chains_bad:
        for line in result.errors[:10]:
            console.print(f"[red]{line}[/]")
        sys.exit(1)


# --- operations over the bus ---------------------------------------------------------

T = TypeVar("T")


def _bus_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds.")(f)
    f = _prefix(f)
    result: Callable[..., Any] = _amqp_url(f)
    return result


def _topology(prefix: str) -> contracts.Topology:
    """The topology of ``prefix`` (a flag's, or the setting's) with the partitions of
    the settings."""
    try:
        return contracts.Topology(prefix, settings.current().partitions)
    except contracts.ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="--prefix") from exc


def _run_bus(
    amqp_url: str,
    prefix: str,
    timeout: float,
    action: Callable[[CoordinatorClient, AmqpTransport, contracts.Topology], Awaitable[T]],
) -> T:
    """Connect, run ``action`` with a client, and turn every failure into one line and
    a meaningful exit code."""
    topology = _topology(prefix)

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
        _fail(f"{exc.error.code}: {exc.error.message}", EXIT_NO)
    except StoreUnavailable as exc:
        _fail(f"{exc.error.code}: {exc.error.message}", EXIT_STORE)
    except CoordinatorUnavailable:
        _fail(
            f"no reply from a coordinator on prefix {prefix!r} within {timeout:g} s "
            "(is `sessionctl coordinator` running?)",
            EXIT_COORDINATOR,
        )
    except TransportError as exc:
        _fail(f"broker at {redact_url(amqp_url)}: {exc}", EXIT_BROKER)
    raise AssertionError("unreachable")  # pragma: no cover


def _uuid(value: str, what: str = "SESSION_ID") -> uuid.UUID:
    try:
        return contracts.parse_session_id(value)
    except contracts.ValidationError as exc:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint=what) from exc


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True))


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value else "-"


# Tables stay readable when piped (rich assumes 80 columns off a terminal).
_console = Console(width=None if sys.stdout.isatty() else 160)


@main.group()
def sessions() -> None:
    """Workflow sessions: list, show, history, integrity, destroy."""


@sessions.command("list")
@_bus_options
@click.option(
    "--status", type=click.Choice([s.value for s in contracts.SessionStatus]), default=None
)
@click.option("--module", "module_id", default=None, help="Only sessions this module linked.")
def sessions_list(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    status: str | None,
    module_id: str | None,
) -> None:
    """Sessions not yet destroyed."""

    async def action(client: CoordinatorClient, *_: Any) -> list[contracts.WorkflowSession]:
        return await client.list_workflow_sessions(
            status=contracts.SessionStatus(status) if status else None, module_id=module_id
        )

    found = _run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        _emit_json(found)
        return
    table = Table(title=f"{len(found)} sessions")
    for column in ("session", "status", "linked", "created", "last activity", "version"):
        table.add_column(column)
    for s in found:
        table.add_row(
            str(s.session_id),
            s.status.value,
            f"{len(s.modules)}/{len(s.required_modules)} required",
            _when(s.created_at),
            _when(s.last_activity),
            str(s.version),
        )
    _console.print(table)


@sessions.command("show")
@_bus_options
@click.argument("session_id")
def sessions_show(
    amqp_url: str, prefix: str, timeout: float, as_json: bool, session_id: str
) -> None:
    """The session tree: the workflow session and each linked module session."""
    sid = _uuid(session_id)

    async def action(client: CoordinatorClient, *_: Any) -> contracts.WorkflowSession | None:
        return await client.get_workflow_session(sid)

    session = _run_bus(amqp_url, prefix, timeout, action)
    if session is None:
        _fail(f"no workflow session {sid}", EXIT_NO)
        return
    if as_json:
        _emit_json(session)
        return
    tree = Tree(
        f"[bold]{session.session_id}[/] {session.status.value}"
        + (" (destroyed)" if session.destroyed else "")
        + f"  created {_when(session.created_at)}  last activity {_when(session.last_activity)}"
    )
    if session.failure is not None:
        tree.add(f"[red]failure {session.failure.code}: {session.failure.message}[/]")
    for module_id in session.required_modules:
        if module_id not in session.modules:
            tree.add(f"[yellow]{module_id}: not linked (required)[/]")
    for module_id, info in sorted(session.modules.items()):
        tree.add(
            f"{module_id}: {info.session_id} {info.status.value}  "
            f"last activity {_when(info.last_activity)}"
        )
    _console.print(tree)


@sessions.command("destroy")
@_bus_options
@click.argument("session_id")
@click.option("--reason", default="destroyed by an operator", show_default=True)
def sessions_destroy(
    amqp_url: str, prefix: str, timeout: float, as_json: bool, session_id: str, reason: str
) -> None:
    """Start CLEANUP; the session is destroyed once its modules unlink."""
    sid = _uuid(session_id)

    async def action(client: CoordinatorClient, *_: Any) -> None:
        await client.destroy_workflow_session(sid, reason)

    _run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        _emit_json({"session_id": str(sid), "cleanup": True})
    else:
        click.echo(f"{sid}: cleanup started")


@sessions.command("history")
@_bus_options
@click.argument("session_id")
@click.option("--as-of", "as_of", type=click.DateTime(), default=None, help="UTC time.")
@click.option("--version", "version", type=click.IntRange(1), default=None)
@click.option("--verify", is_flag=True, help="Verify the hash chain.")
@click.option("--store", default=None, help="Read the event store directly (offline audit).")
def sessions_history(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    session_id: str,
    as_of: datetime | None,
    version: int | None,
    verify: bool,
    store: str | None,
) -> None:
    """The events of one session, the state as of a point, and the chain verdict."""
    sid = _uuid(session_id)
    as_of_utc = as_of.replace(tzinfo=UTC) if as_of is not None and as_of.tzinfo is None else as_of
    verdict: contracts.ChainVerdict | None = None
    if store is not None:
        with _open_store(store) as event_store:
            raw = event_store.raw_history(sid)
            if verify:
                verdict = contracts.verify_chain_raw(raw)
            try:
                events = event_store.history(sid)
            except (msgspec.DecodeError, ValueError, contracts.ContractsError) as exc:
                # A damaged stored event: the verdict names it; show what can be read.
                if verdict is None:
                    _fail(
                        f"session {sid}: a stored event cannot be decoded ({exc}); "
                        "--verify names which",
                        EXIT_NO,
                    )
                events = _readable_prefix(event_store, raw)
        if not events and not raw:
            _fail(f"no history for session {sid} in {store}", EXIT_NO)
        events = [
            e
            for e in events
            if (version is None or e.version <= version)
            and (as_of_utc is None or e.occurred_at <= as_of_utc)
        ]
        history = contracts.SessionHistory(events=events, state=contracts.fold_history(events))
    else:

        async def action(client: CoordinatorClient, *_: Any) -> contracts.SessionHistory:
            return await client.get_session_history(sid)

        full = _run_bus(amqp_url, prefix, timeout, action)
        if verify:
            verdict = contracts.verify_chain(full.events)
        events = [
            e
            for e in full.events
            if (version is None or e.version <= version)
            and (as_of_utc is None or e.occurred_at <= as_of_utc)
        ]
        history = contracts.SessionHistory(events=events, state=contracts.fold_history(events))
    if as_json:
        _emit_json({"history": history, "verdict": verdict})
    else:
        table = Table(title=f"history of {sid}")
        for column in ("v", "time", "event", "actor", "detail"):
            table.add_column(column)
        for e in history.events:
            table.add_row(str(e.version), _when(e.occurred_at), e.type, e.actor, _detail(e.event))
        _console.print(table)
        if history.state is not None:
            state = history.state
            click.echo(
                f"state at version {state.version}: {state.status.value}"
                + (" (destroyed)" if state.destroyed else "")
                + f", linked: {', '.join(sorted(state.modules)) or 'none'}"
            )
        if verdict is not None:
            if verdict.ok:
                click.echo(f"hash chain: ok ({verdict.events_checked} events)")
            else:
                click.echo(
                    f"hash chain: BROKEN at version {verdict.first_bad_version}: {verdict.reason}"
                )
    if verdict is not None and not verdict.ok:
        sys.exit(EXIT_NO)


def _readable_prefix(
    store: EventStore, raw: list[dict[str, Any] | Exception]
) -> list[contracts.EventEnvelope]:
    """The stored events before the first one that cannot be decoded."""
    events: list[contracts.EventEnvelope] = []
    for item in raw:
        if isinstance(item, Exception):
            break
        try:
            events.append(
                msgspec.convert(store.mapper.upcaster.upcast(item), contracts.EventEnvelope)
            )
        except (msgspec.ValidationError, ValueError, contracts.ContractsError):
            break
    return events


def _detail(event: Any) -> str:
    data = msgspec.to_builtins(event)
    data.pop("type", None)
    text = ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, {}, []))
    return text[:100]


@contextlib.contextmanager
def _open_store(url: str) -> Iterator[EventStore]:
    try:
        store = EventStore(url)
    except CoordinatorError as exc:
        _fail(f"store {url}: {exc}", EXIT_USAGE)
        raise AssertionError("unreachable") from exc  # pragma: no cover
    try:
        yield store
    finally:
        store.close()


@sessions.command("integrity")
@_bus_options
@click.argument("session_id", required=False)
@click.option("--all", "all_sessions", is_flag=True, help="Every session not destroyed.")
@click.option("--repair", is_flag=True, help="Fix what can be fixed, and say what was done.")
def sessions_integrity(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    session_id: str | None,
    all_sessions: bool,
    repair: bool,
) -> None:
    """The seed's SessionIntegrityReport, and repair."""
    if (session_id is None) == (not all_sessions):
        raise click.UsageError("give a SESSION_ID or --all (not both)")
    target = _uuid(session_id) if session_id else None

    async def action(client: CoordinatorClient, *_: Any) -> list[tuple[Any, list[str]]]:
        ids = [target] if target else [s.session_id for s in await client.list_workflow_sessions()]
        out: list[tuple[Any, list[str]]] = []
        for sid in ids:
            assert sid is not None
            if repair:
                repaired = await client.repair_session_integrity(sid)
                out.append((repaired.report, repaired.actions))
            else:
                out.append((await client.validate_session_integrity(sid), []))
        return out

    reports = _run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        _emit_json([{"report": r, "actions": a} for r, a in reports])
    else:
        for report, actions in reports:
            mark = "[green]valid[/]" if report.is_valid else "[red]NOT valid[/]"
            _console.print(f"{report.workflow_session_id}: {mark}")
            for label, value in (
                ("linked", report.linked_modules),
                ("missing links", report.missing_links),
                ("orphaned", report.orphaned_sessions),
                ("inconsistent", report.inconsistent_statuses),
            ):
                if value:
                    _console.print(f"  {label}: {value}")
            for line in report.recommendations:
                _console.print(f"  recommendation: {line}")
            for line in actions:
                _console.print(f"  repaired: {line}")
        click.echo(f"{sum(r.is_valid for r, _ in reports)} of {len(reports)} sessions valid")
    if not repair and not all(r.is_valid for r, _ in reports):
        sys.exit(EXIT_NO)


@main.command()
@_bus_options
def modules(amqp_url: str, prefix: str, timeout: float, as_json: bool) -> None:
    """Registered modules: required or not, health from heartbeats, active sessions."""

    async def action(client: CoordinatorClient, *_: Any) -> list[contracts.ModuleInfo]:
        return await client.list_modules()

    found = _run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        _emit_json(found)
        return
    table = Table(title=f"{len(found)} modules")
    for column in ("module", "required", "healthy", "last heartbeat", "active sessions"):
        table.add_column(column)
    for m in found:
        table.add_row(
            m.module_id,
            "yes" if m.required else "no",
            "[green]yes[/]" if m.healthy else "[red]no[/]",
            _when(m.last_heartbeat),
            str(m.active_sessions),
        )
    _console.print(table)


@main.command()
@_bus_options
@settings.option(
    "management_url",
    "--management-url",
    help="RabbitMQ management API, e.g. http://localhost:15672/ (queue list and types; "
    "figures and rates on 3.x).",
)
@settings.option(
    "prometheus_url",
    "--prometheus-url",
    help="rabbitmq_prometheus endpoint, e.g. http://localhost:15692/ (figures and rates; "
    "where RabbitMQ 4 keeps them).",
)
def queues(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    management_url: str | None,
    prometheus_url: str | None,
) -> None:
    """Every sessionbus queue: depth, ready/unacked, consumers, rates."""

    async def action(
        client: CoordinatorClient, transport: AmqpTransport, topology: contracts.Topology
    ) -> list[admin.QueueInfo]:
        try:
            module_ids = [m.module_id for m in await client.list_modules()]
        except (CoordinatorUnavailable, CommandFailed):
            module_ids = list(_SEED_MODULES)
        return await admin.list_queues(
            transport,
            topology,
            amqp_url,
            management_url,
            module_ids,
            prometheus_url=prometheus_url,
        )

    found = _run_bus(amqp_url, prefix, min(timeout, 3.0), action)
    if as_json:
        _emit_json([dataclasses.asdict(q) for q in found])
        return
    table = Table(title=f"queues under {prefix}.")
    for column in ("queue", "type", "messages", "ready", "unacked", "consumers", "in/s", "out/s"):
        table.add_column(column)

    def num(value: float | int | None) -> str:
        return "-" if value is None else f"{value:g}"

    for q in found:
        table.add_row(
            q.name,
            q.kind or "-",
            str(q.messages),
            num(q.ready),
            num(q.unacked),
            str(q.consumers),
            num(q.publish_rate),
            num(q.deliver_rate),
        )
    _console.print(table)
    if found and all(q.source == "passive declare" for q in found):
        click.echo(
            "(no management API or Prometheus endpoint configured and answering: depth and "
            "consumers from passive declares; see --management-url, --prometheus-url)"
        )


_SEED_MODULES = (
    "ai-context-manager",
    "ai-integration",
    "executor",
    "task-loop",
    "step-processor",
    "executor-streamer",
    "frontend-api",
)


@main.group()
def dlq() -> None:
    """Dead letters: list them with their reasons, replay them after a fix."""


@dlq.command("list")
@_bus_options
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
def dlq_list(amqp_url: str, prefix: str, timeout: float, as_json: bool, limit: int) -> None:
    """Dead letters with their reasons, not yet replayed or discarded (read, never
    taken: listing changes nothing)."""

    async def action(
        _: CoordinatorClient, transport: AmqpTransport, topology: contracts.Topology
    ) -> list[admin.DeadLetter]:
        return await admin.browse_dead_letters(transport, topology, limit)

    letters = _run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        _emit_json([dataclasses.asdict(d) for d in letters])
        return
    table = Table(title=f"{len(letters)} dead letters under {prefix}.")
    for column in (
        "offset",
        "message id",
        "rejected by",
        "code",
        "field",
        "reason",
        "from",
        "bytes",
    ):
        table.add_column(column)
    for d in letters:
        table.add_row(
            str(d.offset),
            d.message_id or "-",
            d.rejected_by or "-",
            d.code or "-",
            d.reject_field or "-",
            (d.reason or "-")[:80],
            f"{d.original_exchange or ''} {d.original_routing_key or ''}".strip() or "-",
            str(d.size),
        )
    _console.print(table)


def _dlq_selection(
    message_id: str | None, offset: int | None, every: bool
) -> tuple[str | None, int | None]:
    if (message_id is None and offset is None) == (not every):
        raise click.UsageError("give --id MESSAGE_ID, --offset N or --all")
    return message_id, offset


_DLQ_SELECTION = (
    click.option("--id", "message_id", default=None, help="Only the letter with this message id."),
    click.option("--offset", default=None, type=int, help="Only the letter at this offset."),
    click.option("--all", "every", is_flag=True, help="Every dead letter."),
)


def _with_selection(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_DLQ_SELECTION):
        f = option(f)
    return f


def _settle(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    selection: tuple[str | None, int | None, bool],
    settle: Callable[..., Awaitable[tuple[int, int]]],
    done: str,
) -> None:
    """Replay or discard the selected dead letters (``settle`` is the admin call) and
    say how many were ``done`` and how many are left."""
    message_id, offset = _dlq_selection(*selection)

    async def action(
        _: CoordinatorClient, transport: AmqpTransport, topology: contracts.Topology
    ) -> tuple[int, int]:
        return await settle(transport, topology, message_id=message_id, offset=offset)

    count, kept = _run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        _emit_json({done: count, "kept": kept})
    else:
        click.echo(f"{done} {count} dead letter(s); {kept} left in the queue")
    if not selection[2] and count == 0:
        sys.exit(EXIT_NO)


@dlq.command("replay")
@_bus_options
@_with_selection
def dlq_replay(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    message_id: str | None,
    offset: int | None,
    every: bool,
) -> None:
    """Publish dead letters back to where they came from (then marked settled)."""
    selection = (message_id, offset, every)
    _settle(amqp_url, prefix, timeout, as_json, selection, admin.replay_dead_letters, "replayed")


@dlq.command("discard")
@_bus_options
@_with_selection
def dlq_discard(
    amqp_url: str,
    prefix: str,
    timeout: float,
    as_json: bool,
    message_id: str | None,
    offset: int | None,
    every: bool,
) -> None:
    """Drop dead letters for good (marked settled; nothing is sent)."""
    selection = (message_id, offset, every)
    _settle(amqp_url, prefix, timeout, as_json, selection, admin.discard_dead_letters, "discarded")


@main.command()
@_store
@click.option("--json", "as_json", is_flag=True)
@click.option("--page", default=1000, show_default=True, type=click.IntRange(10, 100_000))
@_rebuild_workers
def replay(store: str, as_json: bool, page: int, rebuild_workers: int | None) -> None:
    """Rebuild the projections from the whole history, with progress, and save them as
    the checkpoint a coordinator starts from."""
    with _open_store(store) as event_store:
        total = event_store.max_position()
        with Progress(
            TextColumn("replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=as_json,
        ) as progress:
            task = progress.add_task("events", total=total)

            def report(position: int, _total: int) -> None:
                progress.update(task, completed=position)

            coordinator = SessionCoordinator(
                event_store,
                progress=report,
                rebuild_page=page,
                rebuild_workers=rebuild_workers,
            )
            coordinator.store = event_store
            started = time.perf_counter()
            coordinator.projections = coordinator.rebuild_from_scratch()
            seconds = time.perf_counter() - started
            coordinator.save_checkpoint()
    proj = coordinator.projections
    figures = {
        "events": proj.events_applied,
        "seconds": round(seconds, 3),
        "events_per_second": round(proj.events_applied / seconds) if seconds > 0 else None,
        "live_sessions": len(proj.sessions),
        "destroyed_sessions": proj.destroyed,
        "position": proj.position,
        "processes": coordinator.rebuild_processes,
    }
    if as_json:
        _emit_json(figures)
    else:
        click.echo(
            f"replayed {figures['events']} events in {seconds:.2f} s "
            f"({figures['events_per_second'] or 0:,} events/s, "
            f"{coordinator.rebuild_processes} process(es)): "
            f"{figures['live_sessions']} live and {figures['destroyed_sessions']} destroyed "
            f"sessions, position {proj.position}"
        )


@main.group()
def audit() -> None:
    """Auditor tools."""


@audit.command("export")
@click.option("--since", type=click.DateTime(), default=None, help="UTC time.")
@click.option("--session", "session_id", default=None)
@click.option("--from-stream", is_flag=True, help="Read the RabbitMQ audit stream, not the store.")
@_store
@_amqp_url
@_prefix
@click.option("--output", "-o", type=click.File("wb"), default="-", show_default=True)
def audit_export(
    since: datetime | None,
    session_id: str | None,
    from_stream: bool,
    store: str,
    amqp_url: str,
    prefix: str,
    output: Any,
) -> None:
    """Events as JSON Lines, from the store or from the audit stream."""
    since_utc = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    sid = _uuid(session_id, "--session") if session_id else None
    err = Console(stderr=True)
    written = 0
    if from_stream:
        topology = _topology(prefix)

        async def go() -> tuple[int, int]:
            count = bad = 0
            async with AmqpTransport(amqp_url, connection_name="sessionctl-audit") as transport:
                async for item in read_audit_stream(transport, topology, since=since_utc):
                    if isinstance(item, contracts.DecodeError):
                        bad += 1
                        continue
                    if sid is not None and item.session_id != sid:
                        continue
                    output.write(admin.to_json_line(item))
                    count += 1
            return count, bad

        try:
            written, bad = asyncio.run(go())
        except TransportError as exc:
            _fail(f"broker at {redact_url(amqp_url)}: {exc}", EXIT_BROKER)
            return
        if bad:
            err.print(f"{bad} undecodable entries in the audit stream were skipped")
    else:
        with _open_store(store) as event_store:
            for env in admin.export_from_store(event_store, since=since_utc, session_id=sid):
                output.write(admin.to_json_line(env))
                written += 1
    output.flush()
    err.print(f"exported {written} events")


@main.command("module")
@click.argument("name", type=click.Choice(sorted(_SEED_MODULES)))
@_amqp_url
@_prefix
def module_command(name: str, amqp_url: str, prefix: str) -> None:
    """Run one of the seven reference modules until SIGTERM or SIGINT."""
    sys.exit(run_module([name, "--amqp-url", amqp_url, "--prefix", prefix]))


@main.command("definitions")
@_prefix
@click.option("--vhost", default="/", show_default=True)
@click.option("--audit-retention", default="30D", show_default=True)
@click.option(
    "--passwords",
    "passwords_file",
    type=click.File("r"),
    default=None,
    help="A file of user=password lines; users missing from it get a random password, "
    "printed to stderr.",
)
def definitions_command(prefix: str, vhost: str, audit_retention: str, passwords_file: Any) -> None:
    """Print RabbitMQ definitions: one user per module with exactly what the SDK uses,
    the coordinator and operator users, and the policies."""
    topology = _topology(prefix)
    given: dict[str, str] = {}
    if passwords_file is not None:
        for line in passwords_file:
            name, sep, password = line.strip().partition("=")
            if sep and name and not name.startswith("#"):
                given[name.strip()] = password.strip()
    passwords = {}
    for user in ("coordinator", "operator", *SEED_MODULES):
        if user not in given:
            given[user] = secrets.token_urlsafe(18)
            click.echo(f"{user}={given[user]}", err=True)
        passwords[user] = given[user]
    doc = definitions(topology, passwords, vhost=vhost, audit_retention=audit_retention)
    click.echo(json.dumps(doc, indent=2))


@main.command("config")
@click.option(
    "--markdown",
    "as_markdown",
    is_flag=True,
    help="The README's configuration table: every variable, its meaning and default.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_command(as_markdown: bool, as_json: bool) -> None:
    """Every SESSIONBUS_* setting: the value a sessionbus process started here would
    take, and where it comes from (URLs with their passwords hidden)."""
    if as_markdown:
        click.echo(settings.markdown(), nl=False)
        return
    rows: dict[str, tuple[str, str]] = {}
    for program in settings.EVERY_PROGRAM:
        try:
            values = program.from_env(os.environ)
        except SettingsError as exc:
            _fail(str(exc), EXIT_USAGE)
            return
        for variable, value, where in values.source(os.environ):
            shown = "" if value is None else str(value)
            if shown and variable.endswith(("_URL", "_STORE")):
                shown = redact_url(shown)
            rows.setdefault(variable, (shown, where))
    if as_json:
        _emit_json({v: {"value": value, "from": where} for v, (value, where) in rows.items()})
        return
    table = Table(title="sessionbus settings")
    for column in ("variable", "value", "from"):
        table.add_column(column)
    for variable, (value, where) in rows.items():
        table.add_row(variable, value or "-", where)
    _console.print(table)
