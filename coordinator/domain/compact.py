"""A compact in-memory form of ``WorkflowSession`` for state that is held, not used.

A folded ``WorkflowSession`` with five linked modules is about 6 KB of Python objects
(structs, dicts, UUIDs, datetimes, strings); the same state packed with msgpack is about
half a kilobyte in one ``bytes`` object that the garbage collector never scans. The
projections keep every live session packed and unpack one when it is read or folded;
the writer's cached aggregates keep theirs packed between commands.

Packing is exact: ``unpack(sid, pack(state))`` equals ``state`` and encodes to the same
bytes on the wire. What the fold always derives is left out (each module's
``linked_workflow_session_id`` and ``module_id``, the three linked-id fields, the
session's ``metadata`` copy of its config's). A state the compact form cannot hold
exactly (a naive or non-UTC datetime, metadata that is not plain JSON data, a field of
an unexpected type) is not packed: ``pack`` returns ``None`` and the caller keeps the
object.

Module ids and statuses are numbered by process-wide tables. Where packed states
leave the process — a partitioned rebuild's workers, the projection checkpoint — the
name table goes with them (``names``) and the receiver renumbers them into its own
(``renumbering``, ``renumber``). A checkpoint records ``FORMAT`` too: change the packed
shapes below and bump it, so that older checkpoints are set aside, not misread.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from contracts import (
    ErrorCode,
    ModuleSessionConfig,
    ModuleSessionInfo,
    SessionStatus,
    StandardError,
    WorkflowConfig,
    WorkflowSession,
)
from contracts.fold import LINKED_ID_FIELDS

__all__ = [
    "FORMAT",
    "created_key",
    "deadline_of",
    "micros",
    "names",
    "pack",
    "renumber",
    "renumbering",
    "unpack",
]

# The packed shapes' version (see the module's docstring).
FORMAT: Final = 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
# Before the msgpack body: created_at, and a deadline the caller gives (or _NO_TIME),
# each in microseconds since the epoch, big-endian, signed; read without unpacking.
_HEADER: Final = 16
_NO_TIME: Final = -(2**63)

_STATUSES: Final = tuple(SessionStatus)
_STATUS_INDEX: Final = {status: index for index, status in enumerate(_STATUSES)}
_LINK_FIELDS: Final = tuple(LINKED_ID_FIELDS.items())
# msgspec omits a default int from the wire only when it is the default object itself:
# the packed form says "the default" (None) rather than the number, to keep that.
_DEFAULTS: Final = WorkflowConfig()


class _Names:
    """Module ids by number, process-wide (two threads pack: projections and writer)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self._lock = threading.Lock()

    def number(self, name: str) -> int:
        found = self.index.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self.index.get(name)
            if found is None:
                found = len(self.names)
                self.names.append(name)
                self.index[name] = found
            return found


_names: Final = _Names()


def names() -> list[str]:
    """This process's module ids, by number (a copy)."""
    with _names._lock:
        return list(_names.names)


def renumbering(foreign: list[str]) -> list[int] | None:
    """How to bring states packed with another process's ``foreign`` name table into
    this process's numbers: ``mapping[theirs] == ours``; ``None`` when they agree."""
    mapping = [_names.number(name) for name in foreign]
    return None if all(ours == theirs for theirs, ours in enumerate(mapping)) else mapping


def renumber(blob: bytes, mapping: list[int]) -> bytes:
    """``blob`` packed with another process's names, in this process's (see
    ``renumbering``). Everything else is copied as it is."""
    p = _decoder.decode(memoryview(blob)[_HEADER:])
    p.required_modules = [mapping[i] for i in p.required_modules]
    for m in p.modules:
        m.name = mapping[m.name]
    return blob[:_HEADER] + _encoder.encode(p)


# The packed shapes: positional (array_like), untracked by the GC (gc=False: decoded
# data holds no cycles), no constraints to check on the way back in.


class _ModuleConfig(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    timeout_ms: Any = None
    retry_attempts: Any = None
    metadata: dict[str, Any] = {}


class _Module(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    name: int
    session_id: uuid.UUID
    status: int
    created_at: datetime
    last_activity: datetime | None  # None: the same as created_at
    config: _ModuleConfig
    metadata: dict[str, Any] = {}


class _Config(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    timeout_ms: Any
    link_timeout_ms: int | None  # None: the default object
    cleanup_timeout_ms: int | None  # None: the default object
    required_modules: list[str] | None
    module_configs: dict[str, _ModuleConfig]
    metadata: dict[str, Any] = {}


class _Failure(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    code: str
    message: str
    module_id: str | None = None
    field: str | None = None
    retryable: bool = False
    details: dict[str, Any] = {}


class _Session(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    status: int
    version: int
    created_at: datetime
    last_activity: datetime | None  # None: the same as created_at
    status_changed_at: datetime | None
    steps: list[str]
    required_modules: list[int]
    modules: list[_Module]
    config: _Config
    destroyed: bool = False
    failure: _Failure | None = None
    # None: equal to config.metadata (what the fold makes of it).
    metadata: dict[str, Any] | None = None


_encoder: Final = msgspec.msgpack.Encoder(uuid_format="bytes")
_decoder: Final = msgspec.msgpack.Decoder(_Session)


class _NotPackable(Exception):
    """The state holds something the compact form would not give back exactly."""


# --- checks --------------------------------------------------------------------------


def _moment(value: object) -> datetime:
    # msgpack timestamps come back as UTC datetimes: only those round-trip exactly.
    if type(value) is not datetime or value.tzinfo is not UTC:
        raise _NotPackable
    return value


def _plain(value: object) -> bool:
    """JSON data (what metadata decoded from the wire always is): msgpack gives it
    back equal and of the same types."""
    kind = type(value)
    if kind is str or kind is bool or value is None or kind is float:
        return True
    if kind is int:
        return -(2**63) <= value < 2**64  # type: ignore[operator]
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())  # type: ignore[attr-defined]
    if kind is list:
        return all(_plain(v) for v in value)  # type: ignore[attr-defined]
    return False


def _metadata(value: object) -> dict[str, Any]:
    if type(value) is not dict:
        raise _NotPackable
    for key, item in value.items():
        # Strings first: nearly every metadata value is one.
        if type(key) is not str or (type(item) is not str and not _plain(item)):
            raise _NotPackable
    return value


def _strings(value: object) -> list[str]:
    if type(value) is not list:
        raise _NotPackable
    for item in value:
        if type(item) is not str:
            raise _NotPackable
    return value


def _optional_int(value: object) -> object:
    if value is not None and type(value) is not int:
        raise _NotPackable
    return value


def _setting(value: object, default: int) -> int | None:
    if value is default:
        return None
    if type(value) is not int:
        raise _NotPackable
    return value


def _module_config(config: object) -> _ModuleConfig:
    if type(config) is not ModuleSessionConfig:
        raise _NotPackable
    timeout, retries, metadata = config.timeout_ms, config.retry_attempts, config.metadata
    if (
        (timeout is not None and type(timeout) is not int)
        or (retries is not None and type(retries) is not int)
        or (metadata and _metadata(metadata) is None)
        or type(metadata) is not dict
    ):
        raise _NotPackable
    return _ModuleConfig(timeout, retries, metadata)


def _config(config: object) -> _Config:
    if type(config) is not WorkflowConfig:
        raise _NotPackable
    required = config.required_modules
    if type(config.module_configs) is not dict:
        raise _NotPackable
    return _Config(
        _optional_int(config.timeout_ms),
        _setting(config.link_timeout_ms, _DEFAULTS.link_timeout_ms),
        _setting(config.cleanup_timeout_ms, _DEFAULTS.cleanup_timeout_ms),
        None if required is None else _strings(required),
        {_text(k): _module_config(v) for k, v in config.module_configs.items()},
        _metadata(config.metadata),
    )


def _text(value: object) -> str:
    if type(value) is not str:
        raise _NotPackable
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _failure(error: object) -> _Failure | None:
    if error is None:
        return None
    if type(error) is not StandardError or type(error.code) is not ErrorCode:
        raise _NotPackable
    if type(error.retryable) is not bool:
        raise _NotPackable
    return _Failure(
        error.code.value,
        _text(error.message),
        _optional_text(error.module_id),
        _optional_text(error.field),
        error.retryable,
        _metadata(error.details),
    )


def _modules(sid: uuid.UUID, modules: object) -> list[_Module]:
    if type(modules) is not dict:
        raise _NotPackable
    numbers = _names.index
    statuses = _STATUS_INDEX
    packed = []
    for key, info in modules.items():
        if type(info) is not ModuleSessionInfo:
            raise _NotPackable
        created, last, linked = info.created_at, info.last_activity, info.linked_workflow_session_id
        if (
            type(created) is not datetime
            or created.tzinfo is not UTC
            or type(last) is not datetime
            or last.tzinfo is not UTC
            or type(info.session_id) is not uuid.UUID
            or type(info.status) is not SessionStatus
            or (linked is not sid and linked != sid)
            or info.module_id != key
        ):
            raise _NotPackable
        number = numbers.get(key)
        if number is None:
            number = _names.number(_text(key))
        metadata = info.metadata
        if metadata:
            _metadata(metadata)
        elif type(metadata) is not dict:
            raise _NotPackable
        packed.append(
            _Module(
                number,
                info.session_id,
                statuses[info.status],
                created,
                None if last is created else last,
                _module_config(info.config),
                metadata,
            )
        )
    return packed


# --- the two directions --------------------------------------------------------------


def micros(moment: datetime) -> int:
    """Microseconds since the epoch: orders like the datetimes themselves."""
    return (moment - _EPOCH) // _MICROSECOND


def pack(state: WorkflowSession, deadline: datetime | None = None) -> bytes | None:
    """The compact form of ``state``, or ``None`` when it cannot hold it exactly.
    ``deadline`` is kept beside it for ``deadline_of``."""
    try:
        return _pack(state, deadline)
    except (_NotPackable, msgspec.EncodeError, OverflowError, TypeError, AttributeError):
        return None


def _pack(state: WorkflowSession, deadline: datetime | None) -> bytes:
    if type(state) is not WorkflowSession:
        raise _NotPackable
    sid = state.session_id
    modules = _modules(sid, state.modules)
    for module_id, name in _LINK_FIELDS:
        info = state.modules.get(module_id)
        linked = getattr(state, name)
        if info is None:
            if linked is not None:
                raise _NotPackable
        elif linked is not info.session_id and linked != info.session_id:
            raise _NotPackable
    config = _config(state.config)
    metadata = _metadata(state.metadata)
    created = _moment(state.created_at)
    last = _moment(state.last_activity)
    changed = state.status_changed_at
    if type(state.version) is not int or type(state.destroyed) is not bool:
        raise _NotPackable
    if type(state.status) is not SessionStatus:
        raise _NotPackable
    packed = _Session(
        _STATUS_INDEX[state.status],
        state.version,
        created,
        None if last is created else last,
        None if changed is None else _moment(changed),
        _strings(state.steps),
        [_names.number(m) for m in _strings(state.required_modules)],
        modules,
        config,
        state.destroyed,
        _failure(state.failure),
        None if metadata == config.metadata else metadata,
    )
    header = micros(created).to_bytes(8, "big", signed=True) + (
        _NO_TIME if deadline is None else micros(_moment(deadline))
    ).to_bytes(8, "big", signed=True)
    return header + _encoder.encode(packed)


def created_key(blob: bytes) -> int:
    """``micros(state.created_at)`` of a packed state, without unpacking it."""
    return int.from_bytes(blob[:8], "big", signed=True)


def deadline_of(blob: bytes) -> datetime | None:
    """The deadline packed with a state, without unpacking it."""
    value = int.from_bytes(blob[8:16], "big", signed=True)
    return None if value == _NO_TIME else _EPOCH + timedelta(microseconds=value)


def _unpack_module_config(c: _ModuleConfig) -> ModuleSessionConfig:
    return ModuleSessionConfig(
        timeout_ms=c.timeout_ms, retry_attempts=c.retry_attempts, metadata=c.metadata
    )


def unpack(session_id: uuid.UUID, blob: bytes) -> WorkflowSession:
    """The ``WorkflowSession`` packed in ``blob`` (a new object on every call)."""
    p = _decoder.decode(memoryview(blob)[_HEADER:])
    names = _names.names
    statuses = _STATUSES
    modules: dict[str, ModuleSessionInfo] = {}
    for m in p.modules:
        name = names[m.name]
        modules[name] = ModuleSessionInfo(
            module_id=name,
            session_id=m.session_id,
            linked_workflow_session_id=session_id,
            status=statuses[m.status],
            created_at=m.created_at,
            last_activity=m.created_at if m.last_activity is None else m.last_activity,
            metadata=m.metadata,
            config=_unpack_module_config(m.config),
        )
    c = p.config
    config = WorkflowConfig(
        timeout_ms=c.timeout_ms,
        link_timeout_ms=_DEFAULTS.link_timeout_ms
        if c.link_timeout_ms is None
        else c.link_timeout_ms,
        cleanup_timeout_ms=_DEFAULTS.cleanup_timeout_ms
        if c.cleanup_timeout_ms is None
        else c.cleanup_timeout_ms,
        required_modules=c.required_modules,
        module_configs={k: _unpack_module_config(v) for k, v in c.module_configs.items()},
        metadata=c.metadata,
    )
    f = p.failure
    failure = (
        None
        if f is None
        else StandardError(
            code=ErrorCode(f.code),
            message=f.message,
            module_id=f.module_id,
            field=f.field,
            retryable=f.retryable,
            details=f.details,
        )
    )
    links = {
        name: (info.session_id if (info := modules.get(module_id)) is not None else None)
        for module_id, name in _LINK_FIELDS
    }
    return WorkflowSession(
        session_id=session_id,
        status=statuses[p.status],
        created_at=p.created_at,
        last_activity=p.created_at if p.last_activity is None else p.last_activity,
        steps=p.steps,
        required_modules=[names[i] for i in p.required_modules],
        modules=modules,
        metadata=dict(c.metadata) if p.metadata is None else p.metadata,
        config=config,
        status_changed_at=p.status_changed_at,
        version=p.version,
        destroyed=p.destroyed,
        failure=failure,
        **links,
    )
