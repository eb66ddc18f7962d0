"""SessionStatus: the transition table and the seed's legacy mappings, checked against
tables written out here rather than recomputed from the code under test."""

from __future__ import annotations

import pytest

from contracts import (
    STATUS_MAPPINGS,
    TRANSITIONS,
    SessionStatus,
    can_transition,
    map_legacy_status,
)

# Rows: from; columns: to. "=" same status (an allowed no-op), "y" allowed, "." refused.
TABLE = """
                INITIALIZING  ACTIVE  PAUSED  COMPLETED  FAILED  CANCELLED  CLEANUP
INITIALIZING         =          y       .        .         y        y         y
ACTIVE               .          =       y        y         y        y         y
PAUSED               .          y       =        .         y        y         y
COMPLETED            .          .       .        =         .        .         y
FAILED               .          .       .        .         =        .         y
CANCELLED            .          .       .        .         .        =         y
CLEANUP              .          .       .        .         .        .         =
"""


def _parse(table: str) -> dict[tuple[str, str], str]:
    header, *rows = (line.split() for line in table.strip().splitlines())
    cells = {}
    for row in rows:
        source, *marks = row
        assert len(marks) == len(header)
        for target, mark in zip(header, marks, strict=True):
            cells[source, target] = mark
    return cells


EXPECTED = _parse(TABLE)

# Exactly as the seed's STATUS_MAPPINGS.
SEED_MAPPINGS = {
    "DISCONNECTED": "FAILED",
    "CONNECTING": "INITIALIZING",
    "CONNECTED": "ACTIVE",
    "ERROR": "FAILED",
    "RATE_LIMITED": "PAUSED",
    "PENDING": "INITIALIZING",
    "IN_PROGRESS": "ACTIVE",
    "SKIPPED": "CANCELLED",
}


def test_the_table_covers_every_pair_of_statuses() -> None:
    """49 cells, one per (old, new) pair of the seven statuses."""
    names = {status.value for status in SessionStatus}
    assert len(names) == 7
    assert set(EXPECTED) == {(a, b) for a in names for b in names}


@pytest.mark.parametrize(("old", "new"), sorted(EXPECTED), ids="->".join)
def test_transition(old: str, new: str) -> None:
    """can_transition(old, new) agrees with the table; TRANSITIONS lists exactly the
    allowed moves to another status."""
    mark = EXPECTED[old, new]
    source, target = SessionStatus(old), SessionStatus(new)
    assert can_transition(source, target) is (mark in {"y", "="})
    assert (target in TRANSITIONS[source]) is (mark == "y")


def test_cleanup_has_no_outgoing_transitions() -> None:
    """CLEANUP ends in a Destroyed event, never in another status."""
    assert TRANSITIONS[SessionStatus.CLEANUP] == frozenset()
    others = [s for s in SessionStatus if s is not SessionStatus.CLEANUP]
    assert not any(can_transition(SessionStatus.CLEANUP, s) for s in others)


def test_every_status_can_reach_cleanup() -> None:
    """Whatever happened, a session can always be cleaned up."""
    assert all(can_transition(s, SessionStatus.CLEANUP) for s in SessionStatus)


def test_status_mappings_are_exactly_the_seeds() -> None:
    """No mapping added, dropped or changed."""
    assert {k: v.value for k, v in STATUS_MAPPINGS.items()} == SEED_MAPPINGS


@pytest.mark.parametrize(("legacy", "status"), SEED_MAPPINGS.items())
def test_map_legacy_status_maps_the_seeds_legacy_values(legacy: str, status: str) -> None:
    """ConnectionStatus / ExecutionStatus values map as the seed says."""
    assert map_legacy_status(legacy) is SessionStatus(status)


@pytest.mark.parametrize("status", list(SessionStatus), ids=str)
def test_map_legacy_status_keeps_session_status_names(status: SessionStatus) -> None:
    """SessionStatus names (incl. COMPLETED and FAILED, which the seed keeps) map to
    themselves."""
    assert map_legacy_status(status.value) is status
