"""Hypothesis strategies derived from msgspec types.

``from_type`` reads a type through ``msgspec.inspect`` and builds values that satisfy
its constraints, so a new message or field is covered without writing a strategy for
it; a type it does not know raises instead of being skipped.
"""

from __future__ import annotations

import datetime as dt
import functools
import typing
from typing import Any, Final

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

import contracts
from contracts import model

__all__ = [
    "BODY_TYPES",
    "JSON_LIKE",
    "UTC_DATETIMES",
    "from_type",
    "wire_types",
]

# Small collections: the aim is to cover shapes, and nested Structs (a history of
# envelopes of events of configs) multiply quickly.
MAX_ITEMS: Final = 3
MAX_TEXT: Final = 16
# Both codecs must carry every value; msgpack's signed range is the narrower one.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

# msgpack decodes every aware datetime to UTC, so UTC is what round-trips exactly.
UTC_DATETIMES: Final = st.datetimes(timezones=st.just(dt.UTC))

# What ``Any`` metadata holds in practice: JSON-like values, without floats (whose
# NaN breaks equality and which the contracts never put in metadata themselves).
JSON_LIKE: Final[st.SearchStrategy[Any]] = st.recursive(
    st.none() | st.booleans() | st.integers(INT64_MIN, INT64_MAX) | st.text(max_size=MAX_TEXT),
    lambda inner: (
        st.lists(inner, max_size=MAX_ITEMS)
        | st.dictionaries(st.text(max_size=8), inner, max_size=MAX_ITEMS)
    ),
    max_leaves=6,
)

BODY_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    contracts.EventEnvelope,
    contracts.CommandRequest,
    contracts.CommandReply,
    contracts.Heartbeat,
)


def wire_types() -> tuple[type[msgspec.Struct], ...]:
    """Every Struct that crosses the wire, from the contracts' own registries: the
    bodies, every event, command and result, and the model types."""
    model_structs = (
        obj
        for name in model.__all__
        if isinstance(obj := getattr(model, name), type) and issubclass(obj, msgspec.Struct)
    )
    return tuple(
        dict.fromkeys(
            (
                *BODY_TYPES,
                *contracts.EVENT_TYPES,
                *contracts.COMMAND_TYPES,
                *typing.get_args(contracts.Result),
                *model_structs,
                contracts.StandardError,
            )
        )
    )


def from_type(type_: Any) -> st.SearchStrategy[Any]:
    """A strategy of valid values of any msgspec-supported type."""
    return _from_info(mi.type_info(type_))


def _from_info(info: mi.Type) -> st.SearchStrategy[Any]:
    match info:
        case mi.StructType():
            return _struct(info.cls)
        case mi.UnionType():
            return st.one_of([_from_info(member) for member in info.types])
        case mi.NoneType():
            return st.none()
        case mi.AnyType():
            return JSON_LIKE
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            return _ints(info)
        case mi.StrType():
            return _strs(info)
        case mi.UUIDType():
            return st.uuids()
        case mi.DateTimeType():
            # tz=None (unconstrained) also gets aware values: naive ones do not survive
            # msgpack, which is not what these tests are about.
            return st.datetimes() if info.tz is False else UTC_DATETIMES
        case mi.EnumType():
            return st.sampled_from(list(info.cls))
        case mi.LiteralType():
            return st.sampled_from(info.values)
        case mi.ListType():
            low, high = _sizes(info.min_length, info.max_length)
            return st.lists(_from_info(info.item_type), min_size=low, max_size=high)
        case mi.DictType():
            low, high = _sizes(info.min_length, info.max_length)
            return st.dictionaries(
                _from_info(info.key_type),
                _from_info(info.value_type),
                min_size=low,
                max_size=high,
            )
    raise TypeError(f"no strategy for {info!r}: teach tests/wire/strategies.py this type")


def _sizes(low: int | None, high: int | None) -> tuple[int, int]:
    low = low or 0
    cap = max(MAX_ITEMS, low)
    return low, cap if high is None else min(high, cap)


def _ints(info: mi.IntType) -> st.SearchStrategy[int]:
    low = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else INT64_MIN)
    high = info.le if info.le is not None else (info.lt - 1 if info.lt is not None else INT64_MAX)
    if info.multiple_of is None:
        return st.integers(low, high)
    step = info.multiple_of
    return st.integers(-(-low // step), high // step).map(lambda n: n * step)


def _strs(info: mi.StrType) -> st.SearchStrategy[str]:
    low = info.min_length or 0
    high = info.max_length
    if info.pattern is None:
        return st.text(min_size=low, max_size=MAX_TEXT if high is None else min(high, MAX_TEXT))
    # msgspec searches with the pattern; fullmatch keeps generated text inside it.
    strategy = st.from_regex(info.pattern, fullmatch=True)
    if low or high is not None:
        strategy = strategy.filter(lambda s: low <= len(s) <= (high or len(s)))
    return strategy


_INVALID: Final = object()


@functools.cache
def _struct(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    # Deferred and cached per class: nested and recursive Structs share one strategy.
    return st.deferred(lambda: _build_struct(cls))


def _build_struct(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    required = {f.name: _from_info(f.type) for f in info.fields if f.required}
    # Leaving a defaulted field out exercises omit_defaults on the wire.
    optional = {f.name: _from_info(f.type) for f in info.fields if not f.required}
    return (
        st.fixed_dictionaries(required, optional=optional)
        .map(functools.partial(_construct, cls))
        .filter(lambda value: value is not _INVALID)
    )


def _construct(cls: type[msgspec.Struct], fields: dict[str, Any]) -> Any:
    try:
        return cls(**fields)
    except ValueError:
        # A __post_init__ rule no field type can express (CommandReply carries exactly
        # one of result and error): drop the draw, as the decoder would refuse it.
        return _INVALID
