"""The hash chain over a session's events: compute, seal, verify.

Lives in ``contracts`` so an auditor can verify exported history with nothing but the
wire definitions. The hash is SHA-256 over a canonical encoding: JSON with keys sorted,
of every envelope field except ``position`` (assigned by the store after the hash is
sealed) and ``hash`` itself. Fields at their default value are left out (every Struct is
``omit_defaults``), so adding a defaulted field to a schema does not change the hash of
events written before it. Timestamps are hashed as written: writers use UTC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import msgspec

from contracts.events import GENESIS_HASH, EventEnvelope

__all__ = ["ChainVerdict", "canonical_bytes", "compute_hash", "seal", "verify_chain"]

_canonical = msgspec.json.Encoder(order="sorted")
_UNHASHED = ("position", "hash")


def canonical_bytes(envelope: EventEnvelope) -> bytes:
    """The exact bytes the hash covers."""
    fields: dict[str, Any] = msgspec.to_builtins(envelope)
    for name in _UNHASHED:
        fields.pop(name, None)
    return _canonical.encode(fields)


def compute_hash(envelope: EventEnvelope) -> str:
    """SHA-256 (hex) of ``canonical_bytes(envelope)``."""
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
    prev_hash = GENESIS_HASH
    expected_version = 1
    session_id: str | None = None
    checked = 0
    for env in envelopes:
        if session_id is None:
            session_id = str(env.session_id)
        checked += 1

        def bad(reason: str, env: EventEnvelope = env) -> ChainVerdict:
            return ChainVerdict(
                session_id=str(env.session_id),
                ok=False,
                events_checked=checked,
                first_bad_version=env.version,
                reason=reason,
            )

        if str(env.session_id) != session_id:
            return bad(f"event belongs to session {env.session_id}, not {session_id}")
        if env.version != expected_version:
            return bad(f"expected version {expected_version}, found {env.version}")
        if env.prev_hash != prev_hash:
            return bad("prev_hash does not match the hash of the previous event")
        actual = compute_hash(env)
        if actual != env.hash:
            return bad(f"content hash is {actual}, the event claims {env.hash}")
        prev_hash = env.hash
        expected_version += 1
    return ChainVerdict(session_id=session_id or "", ok=True, events_checked=checked)
