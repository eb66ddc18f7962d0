"""The hash chain over a session's events: compute, seal, verify.

Lives in ``contracts`` so an auditor can verify exported history with nothing but the
wire definitions. The hash is SHA-256 over a canonical encoding: JSON with keys sorted,
of every envelope field except ``position`` (assigned by the store after the hash is
sealed) and ``hash`` itself. Fields at their default value are left out (every Struct
is ``omit_defaults``, and empty objects are pruned), so adding a defaulted field to a
schema does not change the hash of events written before it. Timestamps are hashed as
written: writers use UTC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import msgspec

from contracts.events import GENESIS_HASH, EventEnvelope

__all__ = [
    "ChainVerdict",
    "canonical_bytes",
    "compute_hash",
    "compute_hash_raw",
    "seal",
    "verify_chain",
    "verify_chain_raw",
]

_canonical = msgspec.json.Encoder(order="sorted")
_UNHASHED = ("position", "hash")


def canonical_bytes(envelope: EventEnvelope | dict[str, Any]) -> bytes:
    """The exact bytes the hash covers. Accepts a typed envelope or its raw decoded
    form (a dict, as read from JSON or msgpack without a schema): verifying the raw
    form checks what was written, before any upcasting."""
    fields: dict[str, Any] = _pruned(msgspec.to_builtins(envelope))
    for name in _UNHASHED:
        fields.pop(name, None)
    return _canonical.encode(fields)


def _pruned(value: Any) -> Any:
    """Drop empty objects, recursively: msgspec omits defaulted fields, but writes a
    Struct-typed field at its default as ``{}``, so a later schema that adds one would
    otherwise change the hash of every old event re-encoded with it."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            kept = _pruned(item)
            if kept != {}:
                out[key] = kept
        return out
    if isinstance(value, list):
        return [_pruned(item) for item in value]
    return value


def compute_hash(envelope: EventEnvelope) -> str:
    """SHA-256 (hex) of ``canonical_bytes(envelope)``."""
    return hashlib.sha256(canonical_bytes(envelope)).hexdigest()


def compute_hash_raw(envelope: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical bytes of a raw decoded envelope."""
    return hashlib.sha256(canonical_bytes(envelope)).hexdigest()


def seal(envelope: EventEnvelope) -> EventEnvelope:
    """A copy of ``envelope`` whose ``hash`` is computed from its content."""
    return msgspec.structs.replace(envelope, hash=compute_hash(envelope))


class ChainVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """Result of verifying one session's chain. ``first_bad_version`` is the earliest
    version whose hash, link or sequence is wrong."""

    session_id: str
    ok: bool
    events_checked: int
    first_bad_version: int | None = None
    reason: str | None = None


def verify_chain(envelopes: Iterable[EventEnvelope]) -> ChainVerdict:
    """Recompute the chain of one session's events, given in version order."""
    return verify_chain_raw(msgspec.to_builtins(env) for env in envelopes)


def verify_chain_raw(envelopes: Iterable[dict[str, Any] | Exception]) -> ChainVerdict:
    """Verify raw decoded envelopes (dicts) in version order. An item may be the
    exception raised decoding it: that version is reported as unreadable."""
    prev_hash = GENESIS_HASH
    expected = 1
    session_id: str | None = None
    checked = 0
    for item in envelopes:
        checked += 1
        if session_id is None and isinstance(item, dict):
            session_id = str(item.get("session_id"))
        problem = _problem(item, session_id, expected, prev_hash)
        if problem is not None:
            return ChainVerdict(
                session_id=session_id or "",
                ok=False,
                events_checked=checked,
                first_bad_version=expected,
                reason=problem,
            )
        assert not isinstance(item, Exception)
        prev_hash = str(item["hash"])
        expected += 1
    return ChainVerdict(session_id=session_id or "", ok=True, events_checked=checked)


def _problem(
    item: dict[str, Any] | Exception, session_id: str | None, expected: int, prev_hash: str
) -> str | None:
    if isinstance(item, Exception):
        return f"stored event cannot be decoded: {item}"
    if session_id is not None and str(item.get("session_id")) != session_id:
        return f"event belongs to session {item.get('session_id')}, not {session_id}"
    if item.get("version") != expected:
        return f"expected version {expected}, found {item.get('version')!r}"
    if item.get("prev_hash") != prev_hash:
        return "prev_hash does not match the hash of the previous event"
    actual = compute_hash_raw(item)
    if actual != item.get("hash"):
        return f"content hash is {actual}, the event claims {item.get('hash')}"
    return None
