"""The delivery checker itself: it must find every kind of wrong delivery it is meant
to, and pass a right one — or the fault scenarios that rely on it prove nothing."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.support.checker import Incarnation, StoreView, check, check_ownership, read_journal
from tests.support.journal_module import Journal

pytestmark = pytest.mark.faults

A, B = uuid.UUID(int=1), uuid.UUID(int=2)
IDS = [uuid.UUID(int=100 + i) for i in range(7)]


def store() -> StoreView:
    """Session A has versions 1..4, session B 1..3."""
    return StoreView(
        versions={A: [1, 2, 3, 4], B: [1, 2, 3]}, event_ids=IDS, envelopes=[], chains_bad={}
    )


def pairs(a: list[int], b: list[int]) -> list[tuple[uuid.UUID, int]]:
    return [(A, v) for v in a] + [(B, v) for v in b]


def test_a_right_delivery_passes_in_every_input_form() -> None:
    published = Counter(IDS) + Counter(IDS[:2])
    for applied in (
        pairs([1, 2, 3, 4], [1, 2, 3]),
        {A: [1, 2, 3, 4], B: [1, 2, 3]},
        [Incarnation(applied=pairs([1, 2, 3, 4], [1, 2, 3]))],
    ):
        report = check(store(), {"m": applied}, published=published)
        report.assert_ok()
        assert report.events_checked == 7
        assert report.published_duplicates == 2


@pytest.mark.parametrize(
    ("applied", "finding"),
    [
        (pairs([1, 2, 4], [1, 2, 3]), "lost"),  # a hole
        (pairs([1, 2, 3], [1, 2, 3]), "lost"),  # the end never applied
        (pairs([1, 2, 2, 3, 4], [1, 2, 3]), "duplicated"),
        (pairs([1, 3, 2, 4], [1, 2, 3]), "out_of_order"),
        (pairs([1, 2, 3, 4, 5], [1, 2, 3]), "phantom"),
        (pairs([], [1, 2, 3]), "lost"),  # a whole session missed
    ],
)
def test_each_wrong_delivery_is_found(applied: list[tuple[uuid.UUID, int]], finding: str) -> None:
    report = check(store(), {"m": applied})
    assert getattr(report, finding), report.summary()
    with pytest.raises(AssertionError, match="delivery check failed"):
        report.assert_ok()


def test_unpublished_events_are_found() -> None:
    report = check(store(), {"m": {A: [1, 2, 3, 4], B: [1, 2, 3]}}, published=Counter(IDS[1:]))
    assert report.unpublished == [IDS[0]]
    assert not report.ok


def test_lives_of_a_module_baselines_and_re_application_after_a_crash() -> None:
    first = Incarnation(applied=pairs([1, 2], [1]), crashed=True)
    # The new life knew A at v3 from the coordinator, B at v1, and got B's v1 again.
    second = Incarnation(applied=pairs([4], [2, 3]), baseline={A: 3, B: 1})
    report = check(store(), {"m": [first, second]})
    report.assert_ok()
    again = Incarnation(applied=pairs([4], [1, 2, 3]), baseline={A: 3})
    report = check(store(), {"m": [first, again]})
    report.assert_ok()
    assert report.reapplied_after_crash == 1
    # The same, had the first life not crashed: a duplicate.
    calm = Incarnation(applied=pairs([1, 2], [1]), crashed=False)
    assert check(store(), {"m": [calm, again]}).duplicated
    # Applying what its start state already had is a duplicate too.
    stale = Incarnation(applied=pairs([3, 4], [1, 2, 3]), baseline={A: 3})
    assert check(store(), {"m": [first, stale]}).duplicated
    # A hole between the baseline and the first applied version is a loss.
    gap = Incarnation(applied=pairs([], [3]), baseline={A: 4, B: 1})
    assert check(store(), {"m": [first, gap]}).lost


def test_a_journal_reads_back_as_lives(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    journal = Journal(path)
    journal.write("start", t=1.0)
    journal.write("baseline", v={})
    journal.write("a", s=str(A), v=1, t=1.1)
    journal.write("made", w=str(A), m=str(B))
    journal.write("start", t=2.0)
    journal.write("baseline", v={str(A): 1})
    journal.write("a", s=str(A), v=2, t=2.1)
    journal.write("destroyed", w=str(A), m=str(B))
    journal.write("stop", stats={})
    journal.close()
    first, second = read_journal(path)
    assert first.crashed
    assert not second.crashed
    assert list(first.applied) == [(A, 1)]
    assert dict(second.baseline) == {A: 1}
    ownership = check_ownership(store(), "m", [first, second])
    assert ownership.destroyed == 1
    assert ownership.leaked == []
