"""Dead letters: list them with their reasons, replay or discard them."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
from rich.table import Table

import contracts
from module_sdk.client import CoordinatorClient
from sessionctl import admin
from sessionctl.commands.common import (
    EXIT_NO,
    bus_options,
    emit_json,
    run_bus,
    stdout_console,
)
from transport.amqp import AmqpTransport


@click.group()
def dlq() -> None:
    """Dead letters: list them with their reasons, replay them after a fix."""


@dlq.command("list")
@bus_options
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
def dlq_list(amqp_url: str, prefix: str, timeout: float, as_json: bool, limit: int) -> None:
    """Dead letters with their reasons, not yet replayed or discarded (read, never
    taken: listing changes nothing)."""

    async def action(
        _: CoordinatorClient, transport: AmqpTransport, topology: contracts.Topology
    ) -> list[admin.DeadLetter]:
        return await admin.browse_dead_letters(transport, topology, limit)

    letters = run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        emit_json([dataclasses.asdict(d) for d in letters])
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
    stdout_console.print(table)


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

    count, kept = run_bus(amqp_url, prefix, timeout, action)
    if as_json:
        emit_json({done: count, "kept": kept})
    else:
        click.echo(f"{done} {count} dead letter(s); {kept} left in the queue")
    if not selection[2] and count == 0:
        sys.exit(EXIT_NO)


@dlq.command("replay")
@bus_options
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
@bus_options
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
