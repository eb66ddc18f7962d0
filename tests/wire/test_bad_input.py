"""Every bad input raises one typed error from the contracts' tree, naming the field
where it can."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import (
    GENESIS_HASH,
    Codec,
    CommandReply,
    CommandRequest,
    ContractsError,
    DecodeError,
    EncodeError,
    ErrorCode,
    EventEnvelope,
    Heartbeat,
    Linked,
    MessageTooLarge,
    SessionManagerHealth,
    StandardError,
    Topology,
    ValidationError,
    codec_for,
    map_legacy_status,
    parse_module_id,
    parse_session_id,
    seal,
)
from contracts.commands import Accepted, UpdateSessionStatus
from contracts.status import SessionStatus

CODECS = [Codec("json"), Codec("msgpack")]
codec_param = pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
BAD_MODULE_IDS = [
    "Task-Loop",
    "task loop",
    "task_loop",
    "task.loop",
    "task-loop\n",
    "-task",
    "task-",
    "task--loop",
    "1task",
    "",
    "a" * 65,
]


def _raw(codec: Codec, fields: dict[str, Any]) -> bytes:
    """Encode plain builtins in the codec's format, bypassing the Structs."""
    if codec.format == "json":
        return msgspec.json.encode(fields)
    return msgspec.msgpack.encode(fields)


def _envelope_fields() -> dict[str, Any]:
    envelope = seal(
        EventEnvelope(
            event_id=uuid.uuid4(),
            session_id=uuid.uuid4(),
            version=1,
            occurred_at=NOW,
            actor="coordinator",
            prev_hash=GENESIS_HASH,
            hash=GENESIS_HASH,
            event=Linked(module_id="task-loop", module_session_id=uuid.uuid4()),
        )
    )
    fields: dict[str, Any] = msgspec.to_builtins(envelope)
    return fields


def _request_fields() -> dict[str, Any]:
    request = CommandRequest(
        command_id=uuid.uuid4(),
        issued_at=NOW,
        command=UpdateSessionStatus(session_id=uuid.uuid4(), status=SessionStatus.ACTIVE),
    )
    fields: dict[str, Any] = msgspec.to_builtins(request)
    return fields


def _heartbeat() -> Heartbeat:
    return Heartbeat(
        module_id="executor",
        instance_id=uuid.UUID("7d4c1f2e-1b0a-4c5e-9f3d-2a1b0c9d8e7f"),
        sent_at=NOW,
        interval_ms=5000,
        health=SessionManagerHealth(
            module_id="executor",
            is_healthy=True,
            active_sessions=1,
            total_sessions=2,
            last_health_check=NOW,
        ),
    )


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(fields: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = fields
        for name in parents:
            target = target[name]
        target[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(fields: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = fields
        for name in parents:
            target = target[name]
        del target[last]

    return mutate


# (case id, message type, base fields, mutation, JSON path the error must name)
CASES: list[tuple[str, type[Any], Callable[[], dict[str, Any]], Callable[..., None], str]] = [
    ("wrong-type", EventEnvelope, _envelope_fields, _set("version", "one"), "$.version"),
    ("out-of-range", EventEnvelope, _envelope_fields, _set("version", 0), "$.version"),
    ("bad-hash", EventEnvelope, _envelope_fields, _set("hash", "ABC"), "$.hash"),
    ("not-a-uuid", EventEnvelope, _envelope_fields, _set("session_id", "42"), "$.session_id"),
    ("missing-field", EventEnvelope, _envelope_fields, _drop("actor"), "$.actor"),
    (
        "missing-nested-field",
        EventEnvelope,
        _envelope_fields,
        _drop("event.module_id"),
        "$.event.module_id",
    ),
    (
        "unknown-event-type",
        EventEnvelope,
        _envelope_fields,
        _set("event.type", "session.exploded"),
        "$.event.type",
    ),
    ("event-without-type", EventEnvelope, _envelope_fields, _drop("event.type"), "$.event.type"),
    (
        "naive-datetime",
        EventEnvelope,
        _envelope_fields,
        _set("occurred_at", "2026-11-25T12:00:00"),
        "$.occurred_at",
    ),
    (
        "unknown-command-type",
        CommandRequest,
        _request_fields,
        _set("command.type", "launch-missiles"),
        "$.command.type",
    ),
    (
        "unknown-status",
        CommandRequest,
        _request_fields,
        _set("command.status", "RUNNING"),
        "$.command.status",
    ),
    (
        "command-not-a-uuid",
        CommandRequest,
        _request_fields,
        _set("command.session_id", "not-a-uuid"),
        "$.command.session_id",
    ),
    (
        "naive-issued-at",
        CommandRequest,
        _request_fields,
        _set("issued_at", "2026-11-25T12:00:00"),
        "$.issued_at",
    ),
]


@codec_param
@pytest.mark.parametrize(
    ("message_type", "base", "mutate", "field"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_invalid_content_raises_validation_error_naming_the_field(
    codec: Codec,
    message_type: type[Any],
    base: Callable[[], dict[str, Any]],
    mutate: Callable[[dict[str, Any]], None],
    field: str,
) -> None:
    """Well-formed bytes that break the schema: ValidationError with the JSON path."""
    fields = base()
    codec.decode(_raw(codec, fields), message_type)  # the unmutated message is valid
    mutate(fields)
    with pytest.raises(ValidationError) as caught:
        codec.decode(_raw(codec, fields), message_type)
    assert caught.value.field == field
    assert not isinstance(caught.value, msgspec.MsgspecError)
    assert isinstance(caught.value.__cause__, msgspec.ValidationError)


@codec_param
@pytest.mark.parametrize("module_id", BAD_MODULE_IDS, ids=repr)
def test_a_module_id_breaking_the_pattern_is_refused(codec: Codec, module_id: str) -> None:
    """Module ids become queue names: anything but lower-case kebab case is refused,
    including a trailing newline that Python's "$" would let through."""
    fields = _envelope_fields()
    fields["event"]["module_id"] = module_id
    with pytest.raises(ValidationError) as caught:
        codec.decode(_raw(codec, fields), EventEnvelope)
    assert caught.value.field == "$.event.module_id"


@codec_param
@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_garbage_bytes_raise_a_decode_error(codec: Codec, garbage: bytes) -> None:
    """Arbitrary bytes never escape as a msgspec or other exception."""
    with pytest.raises(DecodeError) as caught:
        codec.decode(garbage, EventEnvelope)
    assert type(caught.value) in {DecodeError, ValidationError}
    assert not isinstance(caught.value, msgspec.MsgspecError)


@pytest.mark.parametrize(
    ("codec", "garbage"),
    [(CODECS[0], b"{not json"), (CODECS[0], b""), (CODECS[1], b"\xc1"), (CODECS[1], b"")],
    ids=["json-malformed", "json-empty", "msgpack-reserved-byte", "msgpack-empty"],
)
def test_malformed_bytes_are_a_decode_error_not_a_validation_error(
    codec: Codec, garbage: bytes
) -> None:
    """Bytes that are not the format at all are told apart from bad content."""
    with pytest.raises(DecodeError) as caught:
        codec.decode(garbage, CommandRequest)
    assert type(caught.value) is DecodeError
    assert "malformed" in str(caught.value)


@codec_param
def test_an_over_size_body_is_refused_before_parsing(codec: Codec) -> None:
    """max_body is checked first: even garbage over the limit is MessageTooLarge."""
    small = Codec(codec.format, max_body=32)
    with pytest.raises(MessageTooLarge) as caught:
        small.decode(b"\xc1" * 33, EventEnvelope)
    assert (caught.value.size, caught.value.limit) == (33, 32)
    assert isinstance(caught.value, DecodeError)

    body = codec.encode(_heartbeat())
    with pytest.raises(MessageTooLarge):
        Codec(codec.format, max_body=len(body) - 1).decode(body, Heartbeat)
    assert Codec(codec.format, max_body=len(body)).decode(body, Heartbeat) == _heartbeat()


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-pickle"])
def test_an_unknown_content_type_is_a_decode_error(content_type: str) -> None:
    """codec_for refuses content types it cannot decode, naming content_type."""
    with pytest.raises(DecodeError) as caught:
        codec_for(content_type)
    assert caught.value.field == "content_type"


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        (None, "json"),
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("APPLICATION/MSGPACK", "msgpack"),
    ],
)
def test_known_content_types_select_their_codec(content_type: str | None, fmt: str) -> None:
    """Parameters and case do not matter; an absent content type means JSON."""
    assert codec_for(content_type).format == fmt
    assert codec_for(content_type, max_body=10).max_body == 10


@codec_param
@pytest.mark.parametrize("which", ["both", "neither"])
def test_a_reply_with_both_or_neither_result_and_error_is_refused(codec: Codec, which: str) -> None:
    """A CommandReply carries exactly one of result and error, on the wire and when
    constructed."""
    fields: dict[str, Any] = {"command_id": str(uuid.uuid4())}
    if which == "both":
        fields["result"] = msgspec.to_builtins(Accepted())
        fields["error"] = msgspec.to_builtins(StandardError(code=ErrorCode.INTERNAL, message="x"))
    with pytest.raises(ValidationError, match="exactly one of result and error"):
        codec.decode(_raw(codec, fields), CommandReply)

    kwargs: dict[str, Any] = {}
    if which == "both":
        kwargs = {
            "result": Accepted(),
            "error": StandardError(code=ErrorCode.INTERNAL, message="x"),
        }
    with pytest.raises(ValidationError):
        CommandReply(command_id=uuid.uuid4(), **kwargs)


def test_an_encode_failure_is_a_contracts_error() -> None:
    """Values the codec cannot encode raise EncodeError, not a bare TypeError."""
    with pytest.raises(EncodeError):
        Codec("json").encode(object())


@pytest.mark.parametrize("value", ["not-a-uuid", "", "1234", "{}"])
def test_parse_session_id_refuses_non_uuids(value: str) -> None:
    """parse_session_id raises ValidationError naming the field it was given."""
    with pytest.raises(ValidationError) as caught:
        parse_session_id(value)
    assert caught.value.field == "session_id"
    with pytest.raises(ValidationError) as caught:
        parse_session_id(value, field="workflow_session_id")
    assert caught.value.field == "workflow_session_id"


def test_parse_session_id_accepts_uuids_in_any_spelling() -> None:
    """Upper case, braces and UUID objects all parse to the same id."""
    sid = uuid.uuid4()
    assert parse_session_id(str(sid).upper()) == sid
    assert parse_session_id("{" + str(sid) + "}") == sid
    assert parse_session_id(sid) is sid


@pytest.mark.parametrize("value", BAD_MODULE_IDS, ids=repr)
def test_parse_module_id_refuses_ids_breaking_the_pattern(value: str) -> None:
    """parse_module_id applies the same rule as the decoder."""
    with pytest.raises(ValidationError) as caught:
        parse_module_id(value)
    assert caught.value.field == "module_id"


@pytest.mark.parametrize("value", ["executor", "ai-context-manager", "step2-processor", "a"])
def test_parse_module_id_accepts_kebab_case(value: str) -> None:
    """The seed's module ids are valid as they are."""
    assert parse_module_id(value) == value


@pytest.mark.parametrize("value", ["RUNNING", "active", "", "CONNECTED ", "cleanup"])
def test_map_legacy_status_refuses_unknown_values(value: str) -> None:
    """Neither a legacy status nor a SessionStatus name: ValidationError on status."""
    with pytest.raises(ValidationError) as caught:
        map_legacy_status(value)
    assert caught.value.field == "status"


@pytest.mark.parametrize("prefix", ["Bad Prefix", "", "1abc", "a.b", "a*", "x" * 64, "ab\n"])
def test_a_bad_topology_prefix_is_refused(prefix: str) -> None:
    """A prefix becomes part of every name: it must be a plain lower-case word."""
    with pytest.raises(ValidationError) as caught:
        Topology(prefix)
    assert caught.value.field == "prefix"


@pytest.mark.parametrize("module_id", ["Bad", "a.b", "#", "x\n"])
def test_a_module_queue_for_a_bad_module_id_is_refused(module_id: str) -> None:
    """Topology never builds a queue name from an invalid module id."""
    with pytest.raises(ValidationError):
        Topology().module_queue(module_id)


def test_every_error_is_in_one_tree() -> None:
    """One root to catch; ValidationError is also a ValueError for generic callers."""
    assert issubclass(ValidationError, DecodeError)
    assert issubclass(MessageTooLarge, DecodeError)
    assert issubclass(DecodeError, ContractsError)
    assert issubclass(ValidationError, ValueError)
