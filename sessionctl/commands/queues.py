"""Every sessionbus queue, from the management API, Prometheus or passive declares."""

from __future__ import annotations

import dataclasses

import click
from rich.table import Table

import contracts
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable
from sessionctl import admin, settings
from sessionctl.commands.common import (
    SEED_MODULE_IDS,
    bus_options,
    emit_json,
    run_bus,
    stdout_console,
)
from transport.amqp import AmqpTransport


@click.command()
@bus_options
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
            module_ids = list(SEED_MODULE_IDS)
        return await admin.list_queues(
            transport,
            topology,
            amqp_url,
            management_url,
            module_ids,
            prometheus_url=prometheus_url,
        )

    found = run_bus(amqp_url, prefix, min(timeout, 3.0), action)
    if as_json:
        emit_json([dataclasses.asdict(q) for q in found])
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
    stdout_console.print(table)
    if found and all(q.source == "passive declare" for q in found):
        click.echo(
            "(no management API or Prometheus endpoint configured and answering: depth and "
            "consumers from passive declares; see --management-url, --prometheus-url)"
        )
