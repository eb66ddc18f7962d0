"""Schema evolution by msgspec's rules: a new field comes with a default, so old and
new code read each other's messages, and old events keep their hashes."""

from __future__ import annotations

import datetime as dt
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import (
    GENESIS_HASH,
    Codec,
    EventEnvelope,
    SessionCreated,
    compute_hash,
    seal,
    verify_chain,
)


class PingV1(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="type",
    tag="test.ping",
):
    """The "old" schema of a test event."""

    session_id: uuid.UUID
    note: str | None = None


class PingV2(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="type",
    tag="test.ping",
):
    """The "new" schema: same tag, new fields appended with defaults."""

    session_id: uuid.UUID
    note: str | None = None
    attempts: int = 0
    labels: list[str] = msgspec.field(default_factory=list)


class PongV1(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="type",
    tag="test.pong",
):
    """A second member, so the old reader decodes through a tagged union."""

    session_id: uuid.UUID


OldEvent = PingV1 | PongV1


class EnvelopeV2(EventEnvelope, frozen=True, kw_only=True, omit_defaults=True):
    """A future envelope schema with one more defaulted field."""

    priority: int = 0


CODECS = [Codec("json"), Codec("msgpack")]
codec_param = pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)


@codec_param
@settings(max_examples=30, deadline=None)
@given(
    session_id=st.uuids(),
    note=st.none() | st.text(max_size=10),
    attempts=st.integers(-(2**31), 2**31),
    labels=st.lists(st.text(max_size=5), max_size=3),
)
def test_new_bytes_decode_with_the_old_type(
    codec: Codec, session_id: uuid.UUID, note: str | None, attempts: int, labels: list[str]
) -> None:
    """An old reader ignores the fields it does not know, directly and in a union."""
    new = PingV2(session_id=session_id, note=note, attempts=attempts, labels=labels)
    data = codec.encode(new)
    expected = PingV1(session_id=session_id, note=note)
    assert codec.decode(data, PingV1) == expected
    assert codec.decode(data, OldEvent) == expected  # type: ignore[arg-type]


@codec_param
@settings(max_examples=30, deadline=None)
@given(session_id=st.uuids(), note=st.none() | st.text(max_size=10))
def test_old_bytes_decode_with_the_new_type(
    codec: Codec, session_id: uuid.UUID, note: str | None
) -> None:
    """A new reader fills the fields an old writer did not know with their defaults."""
    data = codec.encode(PingV1(session_id=session_id, note=note))
    decoded = codec.decode(data, PingV2)
    assert decoded == PingV2(session_id=session_id, note=note, attempts=0, labels=[])


@codec_param
def test_a_field_at_its_default_is_not_on_the_wire(codec: Codec) -> None:
    """omit_defaults: the new schema writes the same bytes as the old one until a new
    field is set, so old readers see no difference at all."""
    session_id = uuid.uuid4()
    assert codec.encode(PingV2(session_id=session_id)) == codec.encode(
        PingV1(session_id=session_id)
    )
    assert codec.encode(PingV2(session_id=session_id, attempts=1)) != codec.encode(
        PingV1(session_id=session_id)
    )


def _sealed_envelope() -> EventEnvelope:
    return seal(
        EventEnvelope(
            event_id=uuid.UUID("6f1c7e0c-5d4b-4f1e-9a53-2f0cbb4e0d11"),
            session_id=uuid.UUID("0b7b2a4c-8a2e-4f0e-b8e4-8f3f5a3a9c21"),
            version=1,
            occurred_at=dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC),
            actor="coordinator",
            prev_hash=GENESIS_HASH,
            hash=GENESIS_HASH,
            event=SessionCreated(steps=["open", "scrape"]),
        )
    )


@codec_param
def test_a_defaulted_new_field_keeps_the_hash_of_old_events(codec: Codec) -> None:
    """An event sealed before a field existed still verifies when read with the new
    schema, because the field is at its default and so outside the canonical bytes."""
    old = _sealed_envelope()
    upgraded = codec.decode(codec.encode(old), EnvelopeV2)
    assert upgraded.priority == 0
    assert compute_hash(upgraded) == old.hash
    assert verify_chain([upgraded]).ok


def test_a_new_field_set_away_from_its_default_is_covered_by_the_hash() -> None:
    """The counterpart: once the new field carries a value, the hash covers it."""
    old = _sealed_envelope()
    upgraded = msgspec.convert(msgspec.to_builtins(old), EnvelopeV2)
    assert compute_hash(msgspec.structs.replace(upgraded, priority=5)) != old.hash


@codec_param
def test_an_envelope_without_schema_version_was_written_by_version_1(codec: Codec) -> None:
    """The envelope's schema_version defaults to 1, whatever the current version."""
    fields = msgspec.to_builtins(_sealed_envelope())
    fields.pop("schema_version", None)
    data = msgspec.json.encode(fields) if codec.format == "json" else msgspec.msgpack.encode(fields)
    assert codec.decode(data, EventEnvelope).schema_version == 1


class Limits(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A nested options Struct a later schema might add to an envelope."""

    max_steps: int = 0


class EnvelopeV3(EventEnvelope, frozen=True, kw_only=True, omit_defaults=True):
    """A future envelope with a Struct-typed field at its default (msgspec writes it as
    ``{}`` rather than omitting it)."""

    limits: Limits = msgspec.field(default_factory=Limits)


@codec_param
def test_a_new_struct_typed_field_at_its_default_keeps_the_hash(codec: Codec) -> None:
    """Empty objects are outside the canonical bytes, so an event re-encoded with a
    schema that gained a Struct-typed field still verifies."""
    old = _sealed_envelope()
    upgraded = codec.decode(codec.encode(old), EnvelopeV3)
    assert b'"limits":{}' in msgspec.json.encode(upgraded)
    assert compute_hash(upgraded) == old.hash
    assert verify_chain([upgraded]).ok
    changed = msgspec.structs.replace(upgraded, limits=Limits(max_steps=3))
    assert compute_hash(changed) != old.hash
