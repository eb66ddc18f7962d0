"""Broker names: all derived from one prefix, disjoint between prefixes, and the event
routing keys are the event tags."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import (
    DEFAULT_PREFIX,
    EVENT_TYPES,
    Codec,
    EventEnvelope,
    Topology,
    event_type,
)
from contracts.events import EventBase
from contracts.ids import MODULE_ID_PATTERN, PREFIX_PATTERN
from tests.wire.strategies import from_type

PREFIXES = st.from_regex(PREFIX_PATTERN, fullmatch=True)
MODULE_IDS = st.from_regex(MODULE_ID_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 64)
# A topic exchange routing key: dot-separated words, no wildcards.
ROUTING_KEY = re.compile(r"[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+")


def _all_names(topology: Topology, module_ids: list[str]) -> set[str]:
    return {
        *topology.names().values(),
        topology.commands_queue(0),
        topology.commands_queue(7),
        *(topology.module_queue(m) for m in module_ids),
    }


def test_the_default_topology_has_the_designed_names() -> None:
    """The names in the design, for the default prefix."""
    topology = Topology()
    assert topology.prefix == DEFAULT_PREFIX == "sessionbus"
    assert topology.names() == {
        "events_exchange": "sessionbus.events",
        "heartbeats_exchange": "sessionbus.heartbeats",
        "dead_letter_exchange": "sessionbus.dlx",
        "dead_letter_queue": "sessionbus.dlq",
        "dead_letter_stream": "sessionbus.dead-letters",
        "unroutable_exchange": "sessionbus.events.unroutable",
        "unroutable_queue": "sessionbus.unroutable",
        "audit_stream": "sessionbus.audit",
        "commands_queue": "sessionbus.commands",
    }
    assert topology.module_queue("task-loop") == "sessionbus.module.task-loop"
    assert topology.commands_queue(3) == "sessionbus.commands.3"


@settings(max_examples=50, deadline=None)
@given(prefix=PREFIXES, module_ids=st.lists(MODULE_IDS, max_size=3))
def test_every_name_derives_from_the_prefix(prefix: str, module_ids: list[str]) -> None:
    """Every exchange and queue name is "<prefix>.<something>"."""
    topology = Topology(prefix)
    for name in _all_names(topology, module_ids):
        head, _, rest = name.partition(".")
        assert head == prefix
        assert rest


@settings(max_examples=50, deadline=None)
@given(
    prefixes=st.lists(PREFIXES, min_size=2, max_size=2, unique=True),
    module_ids=st.lists(MODULE_IDS, max_size=3),
)
def test_two_prefixes_never_share_a_name(prefixes: list[str], module_ids: list[str]) -> None:
    """Tests and tenants on one broker cannot see each other's exchanges or queues."""
    first, second = (Topology(p) for p in prefixes)
    assert _all_names(first, module_ids).isdisjoint(_all_names(second, module_ids))


def test_fixed_names_are_distinct_within_a_prefix() -> None:
    """No two roles share one exchange or queue."""
    names = list(Topology("t").names().values())
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("event_class", EVENT_TYPES, ids=lambda c: c.__name__)
def test_the_routing_key_of_an_event_is_its_wire_tag(event_class: type[EventBase]) -> None:
    """Routing key == the Struct's tag, a plain dotted topic key."""
    tag = event_class.__struct_config__.tag
    assert event_type(event_class) == tag
    assert Topology.routing_key(tag) == tag
    assert ROUTING_KEY.fullmatch(tag)


def test_all_routing_keys_lists_each_event_type_once() -> None:
    """One routing key per event type, none repeated, in the registry's order."""
    keys = Topology.all_routing_keys()
    assert keys == tuple(cls.__struct_config__.tag for cls in EVENT_TYPES)
    assert len(set(keys)) == len(keys)
    assert {"session.created", "session.status-changed"} <= set(keys)


@settings(max_examples=30, deadline=None)
@given(envelope=from_type(EventEnvelope))
def test_a_decoded_envelope_names_its_routing_key(envelope: EventEnvelope) -> None:
    """A consumer can route or filter on envelope.type without a lookup table."""
    decoded = Codec("json").decode_envelope(Codec("json").encode(envelope))
    assert decoded.type in Topology.all_routing_keys()
    assert decoded.type == type(envelope.event).__struct_config__.tag
