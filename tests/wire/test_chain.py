"""The hash chain over a session's events: valid chains verify, any tampering is found
and located, and the chain survives both codecs."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import (
    GENESIS_HASH,
    ActivityRecorded,
    Codec,
    Event,
    EventEnvelope,
    EventsPage,
    SessionHistory,
    compute_hash,
    seal,
    verify_chain,
)
from tests.wire.strategies import from_type

CODECS = [Codec("json"), Codec("msgpack")]
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def chains(draw: st.DrawFn, min_size: int = 1, max_size: int = 6) -> list[EventEnvelope]:
    """A correctly linked and sealed history of one session."""
    session_id = draw(st.uuids())
    events = draw(st.lists(from_type(Event), min_size=min_size, max_size=max_size))
    # Hypothesis takes naive bounds and applies the timezone; the cap leaves room to
    # add one millisecond per version.
    latest = dt.datetime(9000, 1, 1)  # noqa: DTZ001
    start = draw(st.datetimes(max_value=latest, timezones=st.just(dt.UTC)))
    envelopes: list[EventEnvelope] = []
    prev_hash = GENESIS_HASH
    for version, event in enumerate(events, start=1):
        envelope = seal(
            EventEnvelope(
                event_id=draw(st.uuids()),
                session_id=session_id,
                version=version,
                occurred_at=start + dt.timedelta(milliseconds=version),
                actor=draw(st.text(max_size=20)),
                prev_hash=prev_hash,
                hash=GENESIS_HASH,
                event=event,
                correlation_id=draw(st.none() | st.uuids()),
            )
        )
        envelopes.append(envelope)
        prev_hash = envelope.hash
    return envelopes


def _tamper(envelope: EventEnvelope, field: str, data: st.DataObject) -> EventEnvelope:
    """The same envelope, its claimed hash kept, with one field changed."""
    changes: dict[str, Any]
    if field == "payload":
        changes = {"event": data.draw(from_type(Event).filter(lambda e: e != envelope.event))}
    elif field == "version":
        changes = {
            "version": data.draw(st.integers(1, 10_000).filter(lambda v: v != envelope.version))
        }
    elif field == "prev_hash":
        changes = {"prev_hash": data.draw(HEX64.filter(lambda h: h != envelope.prev_hash))}
    else:
        changes = {field: data.draw(st.text(max_size=20).filter(lambda a: a != envelope.actor))}
    return msgspec.structs.replace(envelope, **changes)


@settings(max_examples=40, deadline=None)
@given(chain=chains())
def test_a_linked_sealed_chain_verifies(chain: list[EventEnvelope]) -> None:
    """seal + prev_hash linking yields a chain verify_chain accepts in full."""
    verdict = verify_chain(chain)
    assert verdict.ok, verdict.reason
    assert verdict.events_checked == len(chain)
    assert verdict.first_bad_version is None
    assert verdict.session_id == str(chain[0].session_id)


@settings(max_examples=20, deadline=None)
@given(chain=chains(), positions=st.data())
def test_store_positions_do_not_affect_the_chain(
    chain: list[EventEnvelope], positions: st.DataObject
) -> None:
    """position is assigned after sealing, so it is outside the hash."""
    placed = [
        env.with_position(positions.draw(st.integers(1, 2**40), label="position")) for env in chain
    ]
    assert verify_chain(placed).ok


@pytest.mark.parametrize("field", ["payload", "version", "prev_hash", "actor"])
@settings(max_examples=25, deadline=None)
@given(chain=chains(), data=st.data())
def test_tampering_with_one_field_is_detected_at_that_event(
    field: str, chain: list[EventEnvelope], data: st.DataObject
) -> None:
    """Changing any one field of any event fails the chain, and first_bad_version
    names the event that was changed."""
    index = data.draw(st.integers(0, len(chain) - 1), label="index")
    tampered = [*chain]
    tampered[index] = _tamper(chain[index], field, data)

    verdict = verify_chain(tampered)

    assert not verdict.ok
    assert verdict.first_bad_version == index + 1
    assert verdict.events_checked == index + 1
    assert verdict.reason


@settings(max_examples=25, deadline=None)
@given(chain=chains(min_size=2), data=st.data())
def test_resealing_a_tampered_event_breaks_the_next_link(
    chain: list[EventEnvelope], data: st.DataObject
) -> None:
    """Recomputing the tampered event's own hash does not help: the following event's
    prev_hash still names the original."""
    index = data.draw(st.integers(0, len(chain) - 2), label="index")
    tampered = [*chain]
    tampered[index] = seal(_tamper(chain[index], "actor", data))

    verdict = verify_chain(tampered)

    assert not verdict.ok
    assert verdict.first_bad_version == index + 2
    assert "prev_hash" in (verdict.reason or "")


def test_an_event_of_another_session_breaks_the_chain() -> None:
    """A correctly sealed event of a different session is not part of this chain."""
    first = seal(
        EventEnvelope(
            event_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
            session_id=uuid.UUID("00000000-0000-4000-8000-0000000000aa"),
            version=1,
            occurred_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            actor="coordinator",
            prev_hash=GENESIS_HASH,
            hash=GENESIS_HASH,
            event=ActivityRecorded(),
        )
    )
    stranger = seal(
        msgspec.structs.replace(
            first,
            session_id=uuid.UUID("00000000-0000-4000-8000-0000000000bb"),
            version=2,
            prev_hash=first.hash,
        )
    )
    verdict = verify_chain([first, stranger])
    assert not verdict.ok
    assert verdict.first_bad_version == 2
    assert "session" in (verdict.reason or "")


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
@settings(max_examples=25, deadline=None)
@given(chain=chains())
def test_a_chain_survives_a_codec_round_trip(codec: Codec, chain: list[EventEnvelope]) -> None:
    """Decoded envelopes hash to the values sealed before encoding, one by one and
    inside the replies that carry histories."""
    decoded = [codec.decode(codec.encode(env), EventEnvelope) for env in chain]
    assert [compute_hash(env) for env in decoded] == [env.hash for env in chain]
    assert verify_chain(decoded).ok

    history = codec.decode(codec.encode(SessionHistory(events=chain, state=None)), SessionHistory)
    page = codec.decode(codec.encode(EventsPage(events=chain, next_position=1)), EventsPage)
    assert verify_chain(history.events).ok
    assert verify_chain(page.events).ok
