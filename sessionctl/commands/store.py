"""Commands on the event store: rebuild the projections (replay), export events
(audit export, from the store or the audit stream)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import contracts
from coordinator.service.coordinator import SessionCoordinator
from sessionctl import admin
from sessionctl.commands.common import (
    EXIT_BROKER,
    amqp_url_option,
    emit_json,
    fail,
    open_store,
    parse_uuid,
    prefix_option,
    rebuild_workers_option,
    store_option,
    topology_for,
)
from transport.amqp import AmqpTransport, redact_url
from transport.audit import read_audit_stream
from transport.port import TransportError


@click.command()
@store_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--page", default=1000, show_default=True, type=click.IntRange(10, 100_000))
@rebuild_workers_option
def replay(store: str, as_json: bool, page: int, rebuild_workers: int | None) -> None:
    """Rebuild the projections from the whole history, with progress, and save them as
    the checkpoint a coordinator starts from."""
    with open_store(store) as event_store:
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
        emit_json(figures)
    else:
        click.echo(
            f"replayed {figures['events']} events in {seconds:.2f} s "
            f"({figures['events_per_second'] or 0:,} events/s, "
            f"{coordinator.rebuild_processes} process(es)): "
            f"{figures['live_sessions']} live and {figures['destroyed_sessions']} destroyed "
            f"sessions, position {proj.position}"
        )


@click.group()
def audit() -> None:
    """Auditor tools."""


@audit.command("export")
@click.option("--since", type=click.DateTime(), default=None, help="UTC time.")
@click.option("--session", "session_id", default=None)
@click.option("--from-stream", is_flag=True, help="Read the RabbitMQ audit stream, not the store.")
@store_option
@amqp_url_option
@prefix_option
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
    sid = parse_uuid(session_id, "--session") if session_id else None
    err = Console(stderr=True)
    written = 0
    if from_stream:
        topology = topology_for(prefix)

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
            fail(f"broker at {redact_url(amqp_url)}: {exc}", EXIT_BROKER)
            return
        if bad:
            err.print(f"{bad} undecodable entries in the audit stream were skipped")
    else:
        with open_store(store) as event_store:
            for env in admin.export_from_store(event_store, since=since_utc, session_id=sid):
                output.write(admin.to_json_line(env))
                written += 1
    output.flush()
    err.print(f"exported {written} events")
