"""Every wire type survives encoding and strict decoding, in both codecs."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import contracts
from contracts import Codec
from tests.wire.strategies import from_type, wire_types

CODECS = [Codec("json"), Codec("msgpack")]
UNIONS = {"Event": contracts.Event, "Command": contracts.Command, "Result": contracts.Result}


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
@pytest.mark.parametrize("message_type", wire_types(), ids=lambda t: t.__name__)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(
    message_type: type[msgspec.Struct], codec: Codec, data: st.DataObject
) -> None:
    """decode(encode(x)) == x for generated values of every message type."""
    value = data.draw(from_type(message_type), label=message_type.__name__)
    assert codec.decode(codec.encode(value), message_type) == value


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
@pytest.mark.parametrize("union", UNIONS.values(), ids=UNIONS.keys())
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_tagged_unions_decode_each_member_to_its_own_class(
    union: Any, codec: Codec, data: st.DataObject
) -> None:
    """A member encoded alone decodes through its union, by tag, to the same class."""
    value = data.draw(from_type(union))
    decoded = codec.decode(codec.encode(value), union)
    assert type(decoded) is type(value)
    assert decoded == value


def test_the_round_trip_covers_every_event_command_and_result() -> None:
    """The round-trip parametrisation is derived from the registries, so a new type
    cannot be left out of it."""
    covered = set(wire_types())
    expected = {
        *contracts.EVENT_TYPES,
        *contracts.COMMAND_TYPES,
        *UNIONS["Result"].__args__,
        contracts.EventEnvelope,
        contracts.CommandRequest,
        contracts.CommandReply,
        contracts.Heartbeat,
        contracts.WorkflowSession,
        contracts.ModuleSessionInfo,
        contracts.StandardError,
    }
    assert expected <= covered


@pytest.mark.parametrize("message_type", wire_types(), ids=lambda t: t.__name__)
def test_every_message_type_omits_defaults_and_tolerates_unknown_fields(
    message_type: type[msgspec.Struct],
) -> None:
    """The two Struct options schema evolution and the hash chain rely on."""
    config = message_type.__struct_config__
    assert config.omit_defaults
    assert not config.forbid_unknown_fields
    assert config.frozen
