"""The exported JSON Schema and AsyncAPI documents cover every message, every name
and every routing key, and are self-contained."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts import EVENT_TYPES, HEADERS, Topology, ValidationError, event_type
from contracts.schema import asyncapi, dumps, json_schema
from tests.wire.strategies import wire_types

ROOT = Path(__file__).resolve().parents[2]
# AsyncAPI 3.0.0 key patterns: channels, operations and a channel's messages; components.
IDENT = re.compile(r"[A-Za-z0-9_\-]+")
COMPONENT_KEY = re.compile(r"[a-zA-Z0-9.\-_]+")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return asyncapi("x")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json_schema()


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref}: {part!r} is inside a non-object"
        assert part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


# --- JSON Schema ---------------------------------------------------------------------


def test_json_schema_defines_every_message_type(schema: dict[str, Any]) -> None:
    """A $defs entry, and a place in the message listing, for every wire type."""
    listed = {name for names in schema["messages"].values() for name in names}
    for message_type in wire_types():
        assert message_type.__name__ in schema["$defs"]
        assert message_type.__name__ in listed
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_json_schema_lists_events_commands_and_results_by_role(schema: dict[str, Any]) -> None:
    """The listing follows the registries: events in EVENT_TYPES order and so on."""
    assert schema["messages"]["events"] == [cls.__name__ for cls in EVENT_TYPES]
    assert set(schema["messages"]["bodies"]) == {
        "EventEnvelope",
        "CommandRequest",
        "CommandReply",
        "Heartbeat",
    }


def test_json_schema_refs_all_resolve(schema: dict[str, Any]) -> None:
    """The document is self-contained."""
    refs = set(_refs(schema))
    assert refs
    for ref in refs:
        _resolve(schema, ref)


def test_json_schema_carries_the_wire_constraints(schema: dict[str, Any]) -> None:
    """Tags, UUIDs, timestamps and module-id patterns reach the schema."""
    linked = schema["$defs"]["Linked"]
    assert linked["properties"]["type"] == {"enum": ["session.linked"]}
    assert "module_id" in linked["required"]
    assert linked["properties"]["module_session_id"]["format"] == "uuid"
    envelope = schema["$defs"]["EventEnvelope"]["properties"]
    assert envelope["occurred_at"]["format"] == "date-time"
    assert linked["properties"]["module_id"]["pattern"].startswith("^[a-z]")


# --- AsyncAPI ------------------------------------------------------------------------


def test_asyncapi_is_version_3_0_0(spec: dict[str, Any]) -> None:
    """The document declares the version it is written in, with the required info."""
    assert spec["asyncapi"] == "3.0.0"
    assert spec["info"]["title"]
    assert isinstance(spec["info"]["version"], str)
    assert spec["defaultContentType"] == "application/json"


def test_asyncapi_names_the_prefixed_exchanges_and_queues(spec: dict[str, Any]) -> None:
    """Every fixed name of Topology("x") appears, and no default-prefix name does."""
    strings = set(_strings(spec))
    text = "\n".join(strings)
    for name in Topology("x").names().values():
        assert name in text, name
    assert "x.events" in text
    assert "x.commands" in {c["address"] for c in spec["channels"].values()}
    assert not any(s.startswith("sessionbus.") for s in strings)


def test_asyncapi_has_a_channel_and_message_per_routing_key(spec: dict[str, Any]) -> None:
    """Each event routing key is a channel on the events topic exchange, carrying a
    message of that name whose payload is an envelope of that event."""
    by_address = {c["address"]: c for c in spec["channels"].values()}
    messages = spec["components"]["messages"]
    for cls in EVENT_TYPES:
        key = event_type(cls)
        channel = by_address[key]
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert channel["bindings"]["amqp"]["is"] == "routingKey"
        assert (exchange["name"], exchange["type"], exchange["durable"]) == (
            "x.events",
            "topic",
            True,
        )
        (message_ref,) = channel["messages"].values()
        message = _resolve(spec, message_ref["$ref"])
        assert message["name"] == key
        assert message in messages.values()
        payload = _resolve(spec, message["payload"]["$ref"])
        event_ref = payload["allOf"][1]["properties"]["event"]["$ref"]
        assert event_ref == f"#/components/schemas/{cls.__name__}"


def test_asyncapi_refs_all_resolve(spec: dict[str, Any]) -> None:
    """Every $ref points inside the document, to something that exists."""
    refs = set(_refs(spec))
    assert len(refs) > 50
    for ref in refs:
        _resolve(spec, ref)


def test_asyncapi_keys_follow_the_spec_patterns(spec: dict[str, Any]) -> None:
    """Channel, operation and message keys use the characters AsyncAPI allows."""
    for channel_id, channel in spec["channels"].items():
        assert IDENT.fullmatch(channel_id)
        assert all(IDENT.fullmatch(key) for key in channel["messages"])
    assert all(IDENT.fullmatch(key) for key in spec["operations"])
    for section in spec["components"].values():
        assert all(COMPONENT_KEY.fullmatch(key) for key in section)


def test_asyncapi_operations_use_their_own_channels_messages(spec: dict[str, Any]) -> None:
    """An operation's messages are messages of the channel it is on (a 3.0 rule)."""
    for op_id, operation in spec["operations"].items():
        assert operation["action"] in {"send", "receive"}, op_id
        channel_ref = operation["channel"]["$ref"]
        _resolve(spec, channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), op_id


def test_asyncapi_operations_cover_every_role(spec: dict[str, Any]) -> None:
    """The coordinator publishes every event and answers commands; modules consume
    events and send commands and heartbeats."""
    operations = spec["operations"]
    channels = spec["channels"]

    def on(op: dict[str, Any]) -> dict[str, Any]:
        resolved: dict[str, Any] = _resolve(spec, op["channel"]["$ref"])
        return resolved

    published = {
        on(op)["address"]
        for op in operations.values()
        if op["action"] == "send" and {"name": "coordinator"} in op["tags"]
    }
    assert set(Topology.all_routing_keys()) <= published

    receive_commands = operations["receiveCommands"]
    assert receive_commands["action"] == "receive"
    assert on(receive_commands)["address"] == "x.commands"
    reply_channel = _resolve(spec, receive_commands["reply"]["channel"]["$ref"])
    assert "CommandReply" in reply_channel["messages"]
    assert reply_channel["address"] is None  # direct reply-to: known at runtime only
    assert receive_commands["reply"]["address"]["location"].startswith("$message.header#/")

    assert operations["sendCommand"]["action"] == "send"
    assert on(operations["sendHeartbeat"])["address"] == "x.heartbeats"
    module_events = operations["receiveModuleEvents"]
    assert module_events["action"] == "receive"
    assert len(module_events["messages"]) == len(EVENT_TYPES)
    assert channels["moduleQueue"]["address"] == "x.module.{moduleId}"
    assert "moduleId" in channels["moduleQueue"]["parameters"]


def test_asyncapi_amqp_bindings(spec: dict[str, Any]) -> None:
    """Binding version 0.3.0 everywhere; exchange kinds and queue types as designed."""
    channels = spec["channels"]
    for channel in channels.values():
        assert channel["bindings"]["amqp"]["bindingVersion"] == "0.3.0"
    for message in spec["components"]["messages"].values():
        assert message["bindings"]["amqp"]["bindingVersion"] == "0.3.0"

    def amqp(channel_id: str) -> dict[str, Any]:
        binding: dict[str, Any] = channels[channel_id]["bindings"]["amqp"]
        return binding

    assert amqp("heartbeats")["exchange"]["type"] == "fanout"
    assert amqp("commands")["queue"] == {
        "name": "x.commands",
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": "/",
    }
    assert amqp("commands")["x-arguments"]["x-queue-type"] == "quorum"
    assert amqp("moduleQueue")["x-arguments"] == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "x.dlx",
        "x-delivery-limit": 10,
        "x-single-active-consumer": True,
    }
    assert amqp("commands")["x-arguments"]["x-single-active-consumer"] is True
    assert amqp("unroutable")["queue"]["name"] == "x.unroutable"
    assert amqp("audit")["x-arguments"]["x-queue-type"] == "stream"
    assert amqp("audit")["queue"]["name"] == "x.audit"
    assert amqp("deadLetters")["queue"]["name"] == "x.dlq"


def test_asyncapi_messages_are_json_with_schema_payloads_and_headers(
    spec: dict[str, Any],
) -> None:
    """Each message is application/json, its payload a components.schemas entry, its
    headers schema naming every sessionbus header."""
    header_names = {v for k, v in vars(HEADERS).items() if k.isupper()}
    assert {"traceparent", "x-session-id", "x-sessionbus-reject-reason"} <= header_names
    for message in spec["components"]["messages"].values():
        assert message["contentType"] == "application/json"
        assert message["payload"]["$ref"].startswith("#/components/schemas/")
        headers = _resolve(spec, message["headers"]["$ref"])
        assert headers["type"] == "object"
        assert set(headers["properties"]) == header_names
    wire = {"CommandRequest", "CommandReply", "Heartbeat", "DeadLetter"}
    assert wire <= set(spec["components"]["messages"])


def test_asyncapi_schemas_cover_every_message_type(spec: dict[str, Any]) -> None:
    """components.schemas holds the same definitions as the JSON Schema export."""
    schemas = spec["components"]["schemas"]
    for message_type in wire_types():
        assert message_type.__name__ in schemas
    assert set(json_schema()["$defs"]) <= set(schemas)


def test_asyncapi_refuses_a_bad_prefix() -> None:
    """The document is built through Topology, which validates the prefix."""
    with pytest.raises(ValidationError):
        asyncapi("Bad Prefix")


def test_dumps_is_stable_indented_json_with_a_trailing_newline() -> None:
    """Two exports of the same prefix are byte-identical and parse back unchanged."""
    text = dumps(asyncapi("x"))
    assert text == dumps(asyncapi("x"))
    assert text.endswith("}\n")
    assert text.startswith('{\n  "asyncapi": "3.0.0"')
    assert json.loads(text) == asyncapi("x")
    assert dumps(asyncapi("y")) != text


# --- CLI -----------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "contracts.schema", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def test_cli_prints_the_json_schema() -> None:
    """`python -m contracts.schema --jsonschema` prints valid JSON: the export."""
    result = _run("--jsonschema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(dumps(json_schema()))


def test_cli_prints_asyncapi_for_a_prefix_by_default() -> None:
    """Without a format flag the CLI prints the AsyncAPI document of --prefix."""
    result = _run("--prefix", "tenant-a")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == asyncapi("tenant-a")


def test_cli_reports_a_bad_prefix_as_a_usage_error() -> None:
    """A bad prefix exits 2 with the reason, and prints no document."""
    result = _run("--prefix", "Bad Prefix")
    assert result.returncode == 2
    assert "prefix" in result.stderr
    assert result.stdout == ""
