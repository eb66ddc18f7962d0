"""``sessionctl``: the command line of sessionbus.

The group and its small commands (schema, definitions, config) are here; the others
live in ``sessionctl.commands``, one module per group, and are added below."""

from __future__ import annotations

import json
import os
import secrets
import sys
from typing import Any

import click
from rich.table import Table

import contracts
from contracts import schema as schema_mod
from module_sdk.logs import configure_logging
from sessionctl import settings
from sessionctl.commands import console, dlq, queues, run, sessions, store
from sessionctl.commands.common import (
    EXIT_USAGE,
    emit_json,
    fail,
    prefix_option,
    stdout_console,
    topology_for,
)
from sessionctl.definitions import SEED_MODULES, definitions
from transport.amqp import redact_url
from transport.settings import SettingsError


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


@main.command("definitions")
@prefix_option
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
    topology = topology_for(prefix)
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
            fail(str(exc), EXIT_USAGE)
            return
        for variable, value, where in values.source(os.environ):
            shown = "" if value is None else str(value)
            if shown and variable.endswith(("_URL", "_STORE")):
                shown = redact_url(shown)
            elif shown and variable.endswith("_SECRET"):
                shown = "***"
            rows.setdefault(variable, (shown, where))
    if as_json:
        emit_json({v: {"value": value, "from": where} for v, (value, where) in rows.items()})
        return
    table = Table(title="sessionbus settings")
    for column in ("variable", "value", "from"):
        table.add_column(column)
    for variable, (value, where) in rows.items():
        table.add_row(variable, value or "-", where)
    stdout_console.print(table)


for command in (
    run.coordinator,
    run.demo,
    run.module_command,
    console.console,
    sessions.sessions,
    sessions.modules,
    queues.queues,
    dlq.dlq,
    store.replay,
    store.audit,
):
    main.add_command(command)
