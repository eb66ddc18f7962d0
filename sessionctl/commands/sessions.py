"""Workflow sessions and registered modules, asked of the coordinator over the bus
(a session's history and its verdict also straight from the store)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click
import msgspec
from rich.table import Table
from rich.tree import Tree

import contracts
from coordinator.store.eventstore import EventStore
from module_sdk.client import CoordinatorClient
from sessionctl import admin
from sessionctl.commands.common import (
    EXIT_NO,
    bus_options,
    emit_json,
    fail,
    open_store,
    parse_uuid,
    run_bus,
    stdout_console,
    when,
)


@click.group()
def sessions() -> None:
    """Workflow sessions: list, show, history, integrity, destroy."""


@sessions.command("list")
@bus_options
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

    found = run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        emit_json(found)
        return
    table = Table(title=f"{len(found)} sessions")
    for column in ("session", "status", "linked", "created", "last activity", "version"):
        table.add_column(column)
    for s in found:
        table.add_row(
            str(s.session_id),
            s.status.value,
            f"{len(s.modules)}/{len(s.required_modules)} required",
            when(s.created_at),
            when(s.last_activity),
            str(s.version),
        )
    stdout_console.print(table)


@sessions.command("show")
@bus_options
@click.argument("session_id")
def sessions_show(
    amqp_url: str, prefix: str, timeout: float, as_json: bool, session_id: str
) -> None:
    """The session tree: the workflow session and each linked module session."""
    sid = parse_uuid(session_id)

    async def action(client: CoordinatorClient, *_: Any) -> contracts.WorkflowSession | None:
        return await client.get_workflow_session(sid)

    session = run_bus(amqp_url, prefix, timeout, action)
    if session is None:
        fail(f"no workflow session {sid}", EXIT_NO)
        return
    if as_json:
        emit_json(session)
        return
    tree = Tree(
        f"[bold]{session.session_id}[/] {session.status.value}"
        + (" (destroyed)" if session.destroyed else "")
        + f"  created {when(session.created_at)}  last activity {when(session.last_activity)}"
    )
    if session.failure is not None:
        tree.add(f"[red]failure {session.failure.code}: {session.failure.message}[/]")
    for module_id in session.required_modules:
        if module_id not in session.modules:
            tree.add(f"[yellow]{module_id}: not linked (required)[/]")
    for module_id, info in sorted(session.modules.items()):
        tree.add(
            f"{module_id}: {info.session_id} {info.status.value}  "
            f"last activity {when(info.last_activity)}"
        )
    stdout_console.print(tree)


@sessions.command("destroy")
@bus_options
@click.argument("session_id")
@click.option("--reason", default="destroyed by an operator", show_default=True)
def sessions_destroy(
    amqp_url: str, prefix: str, timeout: float, as_json: bool, session_id: str, reason: str
) -> None:
    """Start CLEANUP; the session is destroyed once its modules unlink."""
    sid = parse_uuid(session_id)

    async def action(client: CoordinatorClient, *_: Any) -> None:
        await client.destroy_workflow_session(sid, reason)

    run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        emit_json({"session_id": str(sid), "cleanup": True})
    else:
        click.echo(f"{sid}: cleanup started")


@sessions.command("history")
@bus_options
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
    sid = parse_uuid(session_id)
    as_of_utc = as_of.replace(tzinfo=UTC) if as_of is not None and as_of.tzinfo is None else as_of
    verdict: contracts.ChainVerdict | None = None
    if store is not None:
        with open_store(store) as event_store:
            raw = event_store.raw_history(sid)
            if verify:
                verdict = contracts.verify_chain_raw(raw)
            try:
                events = event_store.history(sid)
            except (msgspec.DecodeError, ValueError, contracts.ContractsError) as exc:
                # A damaged stored event: the verdict names it; show what can be read.
                if verdict is None:
                    fail(
                        f"session {sid}: a stored event cannot be decoded ({exc}); "
                        "--verify names which",
                        EXIT_NO,
                    )
                events = _readable_prefix(event_store, raw)
        if not events and not raw:
            fail(f"no history for session {sid} in {store}", EXIT_NO)
        history = admin.history_as_of(
            contracts.SessionHistory(events=events, state=None), version=version, as_of=as_of_utc
        )
    else:

        async def action(client: CoordinatorClient, *_: Any) -> contracts.SessionHistory:
            return await client.get_session_history(sid)

        full = run_bus(amqp_url, prefix, timeout, action)
        if verify:
            verdict = contracts.verify_chain(full.events)
        history = admin.history_as_of(full, version=version, as_of=as_of_utc)
    if as_json:
        emit_json({"history": history, "verdict": verdict})
    else:
        table = Table(title=f"history of {sid}")
        for column in ("v", "time", "event", "actor", "detail"):
            table.add_column(column)
        for e in history.events:
            table.add_row(str(e.version), when(e.occurred_at), e.type, e.actor, _detail(e.event))
        stdout_console.print(table)
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


@sessions.command("integrity")
@bus_options
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
    target = parse_uuid(session_id) if session_id else None

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

    reports = run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        emit_json([{"report": r, "actions": a} for r, a in reports])
    else:
        for report, actions in reports:
            mark = "[green]valid[/]" if report.is_valid else "[red]NOT valid[/]"
            stdout_console.print(f"{report.workflow_session_id}: {mark}")
            for label, value in (
                ("linked", report.linked_modules),
                ("missing links", report.missing_links),
                ("orphaned", report.orphaned_sessions),
                ("inconsistent", report.inconsistent_statuses),
            ):
                if value:
                    stdout_console.print(f"  {label}: {value}")
            for line in report.recommendations:
                stdout_console.print(f"  recommendation: {line}")
            for line in actions:
                stdout_console.print(f"  repaired: {line}")
        click.echo(f"{sum(r.is_valid for r, _ in reports)} of {len(reports)} sessions valid")
    if not repair and not all(r.is_valid for r, _ in reports):
        sys.exit(EXIT_NO)


@click.command()
@bus_options
def modules(amqp_url: str, prefix: str, timeout: float, as_json: bool) -> None:
    """Registered modules: required or not, health from heartbeats, active sessions."""

    async def action(client: CoordinatorClient, *_: Any) -> list[contracts.ModuleInfo]:
        return await client.list_modules()

    found = run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        emit_json(found)
        return
    table = Table(title=f"{len(found)} modules")
    for column in ("module", "required", "healthy", "last heartbeat", "active sessions"):
        table.add_column(column)
    for m in found:
        table.add_row(
            m.module_id,
            "yes" if m.required else "no",
            "[green]yes[/]" if m.healthy else "[red]no[/]",
            when(m.last_heartbeat),
            str(m.active_sessions),
        )
    stdout_console.print(table)
