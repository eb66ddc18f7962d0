"""Several broker addresses in one setting: how the list is read and shown."""

from __future__ import annotations

import pytest

from transport.amqp import AmqpTransport, broker_addresses, redact_url


def test_one_url_is_one_address() -> None:
    assert broker_addresses("amqp://guest:guest@localhost:5672/") == [
        "amqp://guest:guest@localhost:5672/"
    ]


def test_commas_before_a_scheme_separate_addresses() -> None:
    setting = "amqp://u:p@n1:5672/, amqp://u:p@n2:5673/vh,amqps://u:p@n3:5671/?cafile=/ca.pem"
    assert broker_addresses(setting) == [
        "amqp://u:p@n1:5672/",
        "amqp://u:p@n2:5673/vh",
        "amqps://u:p@n3:5671/?cafile=/ca.pem",
    ]


def test_a_comma_inside_a_url_does_not_split_it() -> None:
    """A password or a query may hold a comma; only one before ``amqp(s)://`` splits."""
    setting = "amqp://u:pa,ss@n1:5672/?name=a,b,amqp://u:p@n2:5672/"
    assert broker_addresses(setting) == [
        "amqp://u:pa,ss@n1:5672/?name=a,b",
        "amqp://u:p@n2:5672/",
    ]


def test_a_sequence_of_urls_and_lists_in_it_are_flattened() -> None:
    assert broker_addresses(["amqp://n1/,amqp://n2/", "amqp://n3/"]) == [
        "amqp://n1/",
        "amqp://n2/",
        "amqp://n3/",
    ]


def test_no_address_is_an_error() -> None:
    with pytest.raises(ValueError, match="no broker address"):
        broker_addresses([])
    with pytest.raises(ValueError, match="no broker address"):
        broker_addresses("  ")


def test_every_password_is_hidden() -> None:
    assert redact_url("amqp://u:s1@n1:5672/,amqp://v:s2@n2:5672/") == (
        "amqp://u:***@n1:5672/,amqp://v:***@n2:5672/"
    )


def test_the_transport_keeps_every_address_and_the_first_user() -> None:
    transport = AmqpTransport(["amqp://alice:x@n1:5672/", "amqp://alice:x@n2:5672/"])
    assert transport.addresses == ["amqp://alice:x@n1:5672/", "amqp://alice:x@n2:5672/"]
    assert transport.user == "alice"
    assert "x@" not in repr(transport)
    assert transport.address is None  # not connected yet
