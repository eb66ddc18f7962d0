"""``sessionctl``: the command line of sessionbus."""

from __future__ import annotations

import sys

import click

import contracts
from contracts import schema as schema_mod


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sessionbus")
def main() -> None:
    """Session lifecycle coordination over RabbitMQ."""


@main.command()
@click.option("--asyncapi", "kind", flag_value="asyncapi", default=True, help="AsyncAPI 3.0.")
@click.option("--jsonschema", "kind", flag_value="jsonschema", help="JSON Schema of every message.")
@click.option("--prefix", default=contracts.DEFAULT_PREFIX, show_default=True)
def schema(kind: str, prefix: str) -> None:
    """Print the wire schema generated from the contracts."""
    doc = schema_mod.asyncapi(prefix) if kind == "asyncapi" else schema_mod.json_schema()
    sys.stdout.write(schema_mod.dumps(doc))
