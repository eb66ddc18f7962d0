"""Machine-readable descriptions of the wire: JSON Schema and AsyncAPI 3.0.

Both documents are generated from the msgspec Structs and from ``Topology``, so they
cannot drift from what ``Codec`` accepts or from the names the services declare.

    python -m contracts.schema [--asyncapi | --jsonschema] [--prefix PREFIX]
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec

from contracts import model
from contracts import topology as topology_module
from contracts.codec import JSON, MSGPACK
from contracts.commands import COMMAND_TYPES, CommandReply, CommandRequest, Result
from contracts.errors import ErrorCode, StandardError
from contracts.events import EVENT_TYPES, SCHEMA_VERSION, EventEnvelope, event_type
from contracts.ids import MODULE_ID_PATTERN
from contracts.model import Heartbeat
from contracts.topology import DEFAULT_PREFIX, HEADERS, Topology

__all__ = [
    "AMQP_BINDING_VERSION",
    "ASYNCAPI_VERSION",
    "asyncapi",
    "dumps",
    "header_names",
    "json_schema",
    "main",
    "message_types",
]

JsonDict = dict[str, Any]

ASYNCAPI_VERSION: Final = "3.0.0"
AMQP_BINDING_VERSION: Final = "0.3.0"
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

# The types that travel as an AMQP body; everything else is nested inside one of them.
BODY_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    EventEnvelope,
    CommandRequest,
    CommandReply,
    Heartbeat,
)

# AsyncAPI restricts the keys of channels, operations and a channel's messages.
_IDENT = re.compile(r"[^A-Za-z0-9_-]")
# Topology validates module ids, so the module queue's address template is derived from
# a real name with this id swapped for the parameter.
_SAMPLE_MODULE_ID: Final = "module"
_MODULE_PARAM: Final = "moduleId"
_W3C_TRACEPARENT: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def _unique(types: Iterable[type[msgspec.Struct]]) -> tuple[type[msgspec.Struct], ...]:
    return tuple(dict.fromkeys(types))


def _model_types() -> tuple[type[msgspec.Struct], ...]:
    found = (getattr(model, name) for name in model.__all__)
    structs = (obj for obj in found if isinstance(obj, type) and issubclass(obj, msgspec.Struct))
    return _unique((*structs, StandardError))


def message_types() -> dict[str, tuple[type[msgspec.Struct], ...]]:
    """Every wire type by role, derived from the contracts' own registries."""
    return {
        "bodies": BODY_TYPES,
        "events": tuple(EVENT_TYPES),
        "commands": tuple(COMMAND_TYPES),
        "results": typing.get_args(Result),
        "model": _model_types(),
    }


def header_names() -> dict[str, str]:
    """``HEADERS`` as attribute name -> AMQP header name."""
    return {
        name: value
        for name, value in vars(HEADERS).items()
        if name.isupper() and isinstance(value, str)
    }


def _components(ref_template: str) -> tuple[dict[type[msgspec.Struct], str], JsonDict]:
    """Schemas of every wire type, and the component name msgspec gave each."""
    types = _unique(t for group in message_types().values() for t in group)
    refs, components = msgspec.json.schema_components(types, ref_template=ref_template)
    prefix = ref_template.split("{name}", 1)[0]
    names = {t: ref["$ref"].removeprefix(prefix) for t, ref in zip(types, refs, strict=True)}
    return names, {name: _clean_docs(components[name]) for name in sorted(components)}


def _clean_docs(node: Any) -> Any:
    """Dedent docstring descriptions so the documents read like prose."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_docs(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_docs(item) for item in node]
    return node


def _without_discriminator(node: Any) -> Any:
    """Drop msgspec's OpenAPI-style ``discriminator`` object: AsyncAPI's is a bare
    property name with other semantics. Each tagged Struct's ``type`` enum already
    tells the union's members apart."""
    if isinstance(node, dict):
        return {
            key: _without_discriminator(value)
            for key, value in node.items()
            if not (key == "discriminator" and isinstance(value, dict))
        }
    if isinstance(node, list):
        return [_without_discriminator(item) for item in node]
    return node


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or cls.__name__
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def json_schema() -> JsonDict:
    """A JSON Schema (2020-12) document: one ``$defs`` entry per wire type and
    ``messages`` naming every type by role.

    There is deliberately no top-level union of the bodies: they carry no tag (the
    queue or exchange says which one arrives), so a union would accept a body of one
    kind that happens to fit another. Validate against ``#/$defs/<name>``.
    """
    names, defs = _components("#/$defs/{name}")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "sessionbus wire messages",
        "description": (
            f"Schema version {SCHEMA_VERSION}. Bodies are encoded as {JSON} (default) or "
            f"{MSGPACK} with the same shape. Unknown fields are ignored; tagged unions "
            "are told apart by their `type` field."
        ),
        "messages": {role: [names[t] for t in types] for role, types in message_types().items()},
        "$defs": defs,
    }


def _headers_schema() -> JsonDict:
    known: dict[str, JsonDict] = {
        HEADERS.SCHEMA_VERSION: {
            "type": "integer",
            "minimum": 1,
            "description": "Schema version the body was written with.",
        },
        HEADERS.SESSION_ID: {
            "type": "string",
            "format": "uuid",
            "description": "Session (stream) the event belongs to.",
        },
        HEADERS.VERSION: {
            "type": "integer",
            "minimum": 1,
            "description": "Per-session version of the event.",
        },
        HEADERS.POSITION: {
            "type": "integer",
            "minimum": 1,
            "description": "Global position of the event in the coordinator's store.",
        },
        HEADERS.TRACEPARENT: {
            "type": "string",
            "pattern": _W3C_TRACEPARENT,
            "description": "W3C trace context.",
        },
        HEADERS.TRACESTATE: {"type": "string", "description": "W3C trace state."},
        HEADERS.REJECT_REASON: {
            "type": "string",
            "description": "Why the message was dead-lettered.",
        },
        HEADERS.REJECT_CODE: {
            "type": "string",
            "enum": [code.value for code in ErrorCode],
            "description": "Stable error code of the rejection.",
        },
        HEADERS.REJECT_FIELD: {
            "type": "string",
            "description": "JSON path of the offending field, when known.",
        },
        HEADERS.REJECTED_BY: {
            "type": "string",
            "description": "The consumer that rejected the message.",
        },
    }
    return {
        "type": "object",
        "description": (
            "AMQP headers of sessionbus messages. Session headers are set on events, reject "
            "headers on dead letters; the broker may add its own (x-death, …)."
        ),
        "properties": {
            header: known.get(header, {"type": "string"}) for header in header_names().values()
        },
    }


def _ident(value: str) -> str:
    return _IDENT.sub("_", value)


def _ref(*parts: str) -> JsonDict:
    escaped = (part.replace("~", "~0").replace("/", "~1") for part in parts)
    return {"$ref": "#/" + "/".join(escaped)}


def _exchange_binding(name: str, kind: str) -> JsonDict:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": name,
                "type": kind,
                "durable": True,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _queue_binding(name: str, arguments: JsonDict) -> JsonDict:
    # Binding 0.3.0 has no field for queue arguments; its channel binding admits x-
    # extensions, which carry the x-queue-type and dead-letter arguments.
    binding: JsonDict = {
        "is": "queue",
        "queue": {
            "name": name,
            "durable": True,
            "exclusive": False,
            "autoDelete": False,
            "vhost": "/",
        },
        "bindingVersion": AMQP_BINDING_VERSION,
    }
    if arguments:
        binding["x-arguments"] = arguments
    return {"amqp": binding}


def _message(
    name: str, title: str, summary: str, payload: str, *, description: str | None = None
) -> JsonDict:
    message: JsonDict = {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": JSON,
        "headers": _ref("components", "schemas", "MessageHeaders"),
        "payload": _ref("components", "schemas", payload),
        "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if description:
        message["description"] = description
    return message


def asyncapi(prefix: str = DEFAULT_PREFIX) -> JsonDict:
    """An AsyncAPI 3.0.0 document of every exchange, queue, message and operation for
    one topology prefix."""
    topo = Topology(prefix)
    names, schemas = _components("#/components/schemas/{name}")
    schemas = _without_discriminator(schemas)

    extra_schemas: JsonDict = {"MessageHeaders": _headers_schema()}
    extra_schemas["DeadLetterBody"] = {
        "description": (
            "The rejected body exactly as it arrived: any sessionbus message, or bytes "
            "that did not decode. Its content type is the original one."
        )
    }
    messages: JsonDict = {}
    channels: JsonDict = {}
    operations: JsonDict = {}
    event_messages: list[str] = []

    for cls in EVENT_TYPES:
        name, tag = names[cls], event_type(cls)
        envelope = f"{name}Envelope"
        extra_schemas[envelope] = {
            "title": envelope,
            "description": f"An EventEnvelope carrying a `{tag}` event.",
            "allOf": [
                _ref("components", "schemas", names[EventEnvelope]),
                {
                    "type": "object",
                    "properties": {"event": _ref("components", "schemas", name)},
                },
            ],
        }
        messages[name] = _message(
            tag,
            name,
            _summary(cls),
            envelope,
            description=f"Published with routing key `{topo.routing_key(tag)}`; "
            f"also encodable as {MSGPACK}.",
        )
        event_messages.append(name)
        channel = _ident(tag)
        channels[channel] = {
            "address": topo.routing_key(tag),
            "title": f"{tag} events",
            "description": (
                f"Events of type `{tag}` on the `{topo.events_exchange}` topic exchange."
            ),
            "messages": {name: _ref("components", "messages", name)},
            "bindings": _exchange_binding(topo.events_exchange, "topic"),
        }
        operations[f"publish{name}"] = {
            "action": "send",
            "channel": _ref("channels", channel),
            "summary": f"The coordinator publishes `{tag}` once the event is committed.",
            "messages": [_ref("channels", channel, "messages", name)],
            "tags": [{"name": "coordinator"}],
            "bindings": {
                "amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION},
            },
        }

    for body in (CommandRequest, CommandReply, Heartbeat):
        messages[names[body]] = _message(names[body], names[body], _summary(body), names[body])
    messages["DeadLetter"] = _message(
        "DeadLetter",
        "DeadLetter",
        "A message a consumer rejected, with the reason in its headers.",
        "DeadLetterBody",
    )

    def all_events() -> JsonDict:
        return {key: _ref("components", "messages", key) for key in event_messages}

    module_queue = topo.module_queue(_SAMPLE_MODULE_ID)
    module_address = module_queue.removesuffix(_SAMPLE_MODULE_ID) + f"{{{_MODULE_PARAM}}}"
    command_request = names[CommandRequest]
    command_reply = names[CommandReply]
    heartbeat = names[Heartbeat]

    channels["commands"] = {
        "address": topo.commands_queue(),
        "title": "Commands",
        "description": (
            "Commands to the coordinator. Request/reply: the reply goes to the request's "
            "reply_to (RabbitMQ direct reply-to) with the request's correlation_id. The "
            "sender is the broker-validated AMQP user_id, never a body field."
        ),
        "messages": {command_request: _ref("components", "messages", command_request)},
        "bindings": _queue_binding(
            topo.commands_queue(), dict(topo.commands_queue_spec().arguments)
        ),
    }
    channels["commandReplies"] = {
        "address": None,
        "title": "Command replies",
        "description": (
            "Replies through RabbitMQ direct reply-to (amq.rabbitmq.reply-to): the "
            "address is the request's reply_to, known only at runtime."
        ),
        "messages": {command_reply: _ref("components", "messages", command_reply)},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                # The AMQP default exchange is the one named "".
                "exchange": {"name": "", "type": "default", "durable": True, "autoDelete": False},
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }
    channels["heartbeats"] = {
        "address": topo.heartbeats_exchange,
        "title": "Heartbeats",
        "description": (
            "Module liveness, not event-sourced. Each coordinator consumes them from a "
            f"queue of its own, `{topo.heartbeats_queue_for('<instance>')}`, which the "
            "broker deletes once it has had no consumer for a while (x-expires)."
        ),
        "messages": {heartbeat: _ref("components", "messages", heartbeat)},
        "bindings": _exchange_binding(topo.heartbeats_exchange, "fanout"),
    }
    channels["deadLetters"] = {
        "address": topo.dead_letter_queue,
        "title": "Dead letters (inbox)",
        "description": (
            f"Rejected messages from every sessionbus queue, routed through the "
            f"`{topo.dead_letter_exchange}` exchange; moved unchanged to "
            f"`{topo.dead_letter_stream}` before they are read."
        ),
        "messages": {"DeadLetter": _ref("components", "messages", "DeadLetter")},
        "bindings": _queue_binding(
            topo.dead_letter_queue,
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": topology_module.DEAD_LETTER_INBOX_DELIVERY_LIMIT,
            },
        ),
    }
    channels["deadLetterStream"] = {
        "address": topo.dead_letter_stream,
        "title": "Dead letters (kept)",
        "description": (
            "Stream of dead letters, read from the first offset without taking anything; "
            "a letter replayed or discarded is followed by a settlement entry naming its "
            "offset (header `x-sessionbus-dlq-entry: settled`)."
        ),
        "messages": {"DeadLetter": _ref("components", "messages", "DeadLetter")},
        "bindings": _queue_binding(topo.dead_letter_stream, topo.dead_letter_stream_arguments()),
    }
    channels["unroutable"] = {
        "address": topo.unroutable_queue,
        "title": "Unroutable events",
        "description": (
            f"`{topo.unroutable_exchange}` is the alternate exchange of "
            f"`{topo.events_exchange}`: an event no queue is bound for lands here "
            "instead of being dropped."
        ),
        "messages": all_events(),
        "bindings": _queue_binding(
            topo.unroutable_queue,
            next(dict(q.arguments) for q in topo.queue_specs() if q.name == topo.unroutable_queue),
        ),
    }
    channels["audit"] = {
        "address": topo.audit_stream,
        "title": "Audit stream",
        "description": (
            f"Stream queue bound to `{topo.events_exchange}` with `#`: every event, "
            "replayable from the first offset or a timestamp."
        ),
        "messages": all_events(),
        "bindings": _queue_binding(
            topo.audit_stream,
            {"x-queue-type": "stream", "x-max-age": topology_module.DEFAULT_AUDIT_RETENTION},
        ),
    }
    channels["moduleQueue"] = {
        "address": module_address,
        "title": "Module queue",
        "description": (
            f"A module's own queue, bound to `{topo.events_exchange}` with "
            f"{', '.join(topology_module.MODULE_ROUTING_KEYS)}; single active consumer, so "
            "one replica of a module at a time sees a session's events, in order."
        ),
        "parameters": {_MODULE_PARAM: _ref("components", "parameters", _MODULE_PARAM)},
        "messages": all_events(),
        "bindings": _queue_binding(
            module_address, dict(topo.module_queue_spec(_SAMPLE_MODULE_ID).arguments)
        ),
    }

    reply = {
        "address": {
            "location": "$message.header#/reply_to",
            "description": "The AMQP reply_to property of the request.",
        },
        "channel": _ref("channels", "commandReplies"),
        "messages": [_ref("channels", "commandReplies", "messages", command_reply)],
    }
    ack = {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}}
    operations.update(
        {
            "receiveCommands": {
                "action": "receive",
                "channel": _ref("channels", "commands"),
                "summary": "The coordinator validates and applies commands, then replies.",
                "messages": [_ref("channels", "commands", "messages", command_request)],
                "reply": reply,
                "tags": [{"name": "coordinator"}],
                "bindings": ack,
            },
            "sendCommand": {
                "action": "send",
                "channel": _ref("channels", "commands"),
                "summary": "A module or client sends a command and awaits its reply.",
                "messages": [_ref("channels", "commands", "messages", command_request)],
                "reply": reply,
                "tags": [{"name": "module"}],
            },
            "sendHeartbeat": {
                "action": "send",
                "channel": _ref("channels", "heartbeats"),
                "summary": "A module instance reports that it is alive.",
                "messages": [_ref("channels", "heartbeats", "messages", heartbeat)],
                "tags": [{"name": "module"}],
            },
            "receiveHeartbeats": {
                "action": "receive",
                "channel": _ref("channels", "heartbeats"),
                "summary": "The coordinator derives module health from heartbeat age.",
                "messages": [_ref("channels", "heartbeats", "messages", heartbeat)],
                "tags": [{"name": "coordinator"}],
            },
            "receiveModuleEvents": {
                "action": "receive",
                "channel": _ref("channels", "moduleQueue"),
                "summary": "A module applies its sessions' events in version order.",
                "messages": [
                    _ref("channels", "moduleQueue", "messages", key) for key in event_messages
                ],
                "tags": [{"name": "module"}],
                "bindings": ack,
            },
            "readAuditStream": {
                "action": "receive",
                "channel": _ref("channels", "audit"),
                "summary": "An auditor replays the event history.",
                "messages": [_ref("channels", "audit", "messages", key) for key in event_messages],
                "tags": [{"name": "auditor"}],
            },
            "readDeadLetters": {
                "action": "receive",
                "channel": _ref("channels", "deadLetters"),
                "summary": "Operators inspect and replay rejected messages.",
                "messages": [_ref("channels", "deadLetters", "messages", "DeadLetter")],
                "tags": [{"name": "ops"}],
            },
        }
    )

    clashes = schemas.keys() & extra_schemas.keys()
    if clashes:
        raise RuntimeError(f"schema names generated twice: {sorted(clashes)}")
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "sessionbus",
            "version": str(SCHEMA_VERSION),
            "description": (
                "Session lifecycle coordination as an event-sourced message bus. The "
                "coordinator is the only writer: it applies commands, appends events and "
                f"publishes them. Topology prefix `{topo.prefix}`."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": JSON,
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "Default broker; SESSIONBUS_AMQP_URL selects another.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {**schemas, **dict(sorted(extra_schemas.items()))},
            "messages": messages,
            "parameters": {
                _MODULE_PARAM: {
                    "description": (
                        f"Module id, lower-case kebab case matching `{MODULE_ID_PATTERN}`."
                    ),
                    "examples": ["task-loop", "ai-context-manager"],
                }
            },
        },
    }


def dumps(doc: JsonDict) -> str:
    """Stable, indented JSON with a trailing newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print a document to stdout; the CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m contracts.schema",
        description="Print the sessionbus wire schema, generated from the contracts.",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--asyncapi",
        dest="kind",
        action="store_const",
        const="asyncapi",
        help="AsyncAPI 3.0.0 document of the topology (default)",
    )
    kind.add_argument(
        "--jsonschema",
        dest="kind",
        action="store_const",
        const="jsonschema",
        help="JSON Schema of every message",
    )
    parser.set_defaults(kind="asyncapi")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"topology prefix for --asyncapi (default: {DEFAULT_PREFIX})",
    )
    args = parser.parse_args(argv)
    if args.kind == "jsonschema":
        doc = json_schema()
    else:
        try:
            doc = asyncapi(args.prefix)
        except ValueError as exc:
            parser.error(str(exc))
    sys.stdout.buffer.write(dumps(doc).encode())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
