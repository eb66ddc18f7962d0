"""The transport's own marshalling of AMQP message properties writes exactly the bytes
pamqp's generic one writes, for any combination of properties."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiormq import spec
from hypothesis import given, settings
from hypothesis import strategies as st

from transport._aiormq_publish import FastProperties

short = st.one_of(st.none(), st.just(""), st.text(max_size=40))
table_values = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.none(),
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": short,
        "content_encoding": short,
        "headers": st.one_of(
            st.none(), st.dictionaries(st.text(min_size=1, max_size=20), table_values, max_size=6)
        ),
        "delivery_mode": st.one_of(st.none(), st.sampled_from([1, 2])),
        "priority": st.one_of(st.none(), st.integers(0, 9)),
        "correlation_id": short,
        "reply_to": short,
        "expiration": st.one_of(st.none(), st.integers(1, 10**9).map(str)),
        "message_id": short,
        "timestamp": st.one_of(
            st.none(),
            st.datetimes(
                min_value=datetime(1971, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive
                max_value=datetime(2200, 1, 1),  # noqa: DTZ001
                timezones=st.just(UTC),
            ),
        ),
        "message_type": short,
        "user_id": short,
        "app_id": short,
    },
)


@settings(max_examples=400)
@given(properties)
def test_the_same_bytes_as_pamqp(fields: dict[str, object]) -> None:
    ours = FastProperties(**fields).marshal()  # type: ignore[arg-type]
    assert ours == spec.Basic.Properties(**fields).marshal()  # type: ignore[arg-type]


def test_an_over_long_short_string_is_refused() -> None:
    with pytest.raises(TypeError, match="255"):
        FastProperties(correlation_id="x" * 256).marshal()
