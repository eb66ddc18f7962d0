"""The delivery checker itself: it must find every kind of wrong delivery it is meant
to, and pass a right one — or the fault scenarios that rely on it prove nothing."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.support.checker import (
    HookCall,
    Incarnation,
    StoreView,
    check,
    check_ownership,
    read_journal,
)
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


def test_an_event_is_identified_by_its_id_as_well_as_its_session_and_version() -> None:
    ids_at = {(A, v): IDS[v - 1] for v in range(1, 5)} | {(B, v): IDS[3 + v] for v in range(1, 4)}
    view = StoreView(
        versions={A: [1, 2, 3, 4], B: [1, 2, 3]},
        event_ids=IDS,
        envelopes=[],
        chains_bad={},
        ids_at=ids_at,
    )
    right = [ids_at[pair] for pair in pairs([1, 2, 3, 4], [1, 2, 3])]
    life = Incarnation(applied=pairs([1, 2, 3, 4], [1, 2, 3]), event_ids=right)
    check(view, {"m": [life]}).assert_ok()
    # B's v2 applied with A's v2 id: the right version, another event.
    wrong = [*right[:5], IDS[1], right[6]]
    report = check(view, {"m": [Incarnation(applied=life.applied, event_ids=wrong)]})
    assert len(report.mismatched) == 1
    with pytest.raises(AssertionError, match="mismatched"):
        report.assert_ok()
    # Registry events are known by id only: once per life, and stored.
    registry = IDS[0]
    twice = Incarnation(applied=life.applied, registry=[registry, registry])
    assert check(view, {"m": [twice]}).duplicated
    unknown = Incarnation(applied=life.applied, registry=[uuid.UUID(int=999)])
    assert check(view, {"m": [unknown]}).phantom
    crashed = Incarnation(applied=pairs([1, 2], [1]), registry=[registry], crashed=True)
    again = Incarnation(applied=pairs([3, 4], [2, 3]), baseline={A: 2, B: 1}, registry=[registry])
    report = check(view, {"m": [crashed, again]})
    report.assert_ok()
    assert report.reapplied_after_crash == 1


def hooked(*hooks: HookCall, crashed: bool = False) -> Incarnation:
    return Incarnation(applied=pairs([1, 2, 3, 4], [1, 2, 3]), hooks=hooks, crashed=crashed)


M1, M2 = uuid.UUID(int=51), uuid.UUID(int=52)


@pytest.mark.parametrize(
    ("lives", "kind"),
    [
        # on_create after the store destroyed the session (at t=100)
        ([hooked(HookCall("create", A, M1, wall=101.0))], "create_for_destroyed"),
        # a link the coordinator refused: the session was destroyed, or cleaning up
        (
            [hooked(HookCall("link", A, M1, wall=90.0, outcome="SESSION_DESTROYED"))],
            "link_for_destroyed",
        ),
        (
            [hooked(HookCall("link", B, M1, wall=90.0, outcome="SESSION_CLOSED"))],
            "link_for_destroyed",
        ),
        ([hooked(HookCall("link", A, M1, wall=100.5, outcome="ok"))], "link_for_destroyed"),
        (
            [hooked(HookCall("create", B, M1, wall=1.0), HookCall("create", B, M2, wall=2.0))],
            "create_twice",
        ),
        (
            [hooked(HookCall("destroy", A, M1, wall=1.0), HookCall("destroy", A, M2, wall=2.0))],
            "destroy_twice",
        ),
        # a second life repeating what a life that stopped cleanly already did
        (
            [hooked(HookCall("destroy", A, M1, wall=1.0)), hooked(HookCall("destroy", A, M1))],
            "destroy_twice",
        ),
    ],
)
def test_each_spurious_hook_call_is_counted(lives: list[Incarnation], kind: str) -> None:
    view = store()
    view.destroyed_at[A] = 100.0
    report = check(view, {"m": lives})
    assert report.spurious[kind] == 1, report.summary()
    assert report.spurious_hook_count == 1
    assert report.summary()["spurious_hooks"] == 1
    with pytest.raises(AssertionError, match="spurious_hooks"):
        report.assert_ok()


def test_right_hook_calls_and_repeats_after_a_crash_are_not_spurious() -> None:
    view = store()
    view.destroyed_at[A] = 100.0
    first = hooked(
        HookCall("create", A, M1, wall=1.0),
        HookCall("link", A, M1, wall=1.1, outcome="ok"),
        HookCall("destroy", A, M1, wall=50.0),
        crashed=True,
    )
    # The killed life had destroyed M1 but not unlinked it: the new one destroys it again.
    second = hooked(HookCall("destroy", A, M1, wall=60.0), HookCall("create", B, M2, wall=61.0))
    report = check(view, {"m": [first, second]})
    report.assert_ok()
    assert report.hook_calls == 5
    assert report.hooks_repeated_after_crash == 1
    assert report.spurious_hook_count == 0


def test_a_journal_reads_back_hook_calls_and_event_ids(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    journal = Journal(path)
    journal.write("start", t=1.0)
    journal.write("a", s=str(A), v=1, e=str(IDS[0]), t=1.1)
    journal.write("r", e=str(IDS[6]))
    journal.write("made", w=str(A), m=str(M1), wt=5.0)
    journal.write("link", w=str(A), m=str(M1), wt=5.1, r="SESSION_DESTROYED")
    journal.write("destroyed", w=str(A), m=str(M1), wt=5.2)
    journal.close()
    (life,) = read_journal(path)
    assert list(life.event_ids) == [IDS[0]]
    assert list(life.registry) == [IDS[6]]
    assert [(h.kind, h.wall, h.outcome) for h in life.hooks] == [
        ("create", 5.0, None),
        ("link", 5.1, "SESSION_DESTROYED"),
        ("destroy", 5.2, None),
    ]


def test_a_link_refused_by_a_race_is_not_spurious_but_one_sent_knowing_is() -> None:
    """A link refused because the session ended while the module still held it live is a
    race (counted apart); one sent while the module already held the ending version is
    spurious."""
    view = store()
    view.ended_at_version[B] = 3  # B left its live statuses at version 3
    raced = hooked(HookCall("link", B, M1, wall=1.0, outcome="SESSION_CLOSED", known_version=2))
    report = check(view, {"m": [raced]})
    report.assert_ok()
    assert report.links_refused_by_race == 1
    knowing = hooked(HookCall("link", B, M1, wall=1.0, outcome="SESSION_CLOSED", known_version=3))
    report = check(view, {"m": [knowing]})
    assert report.spurious["link_for_destroyed"] == 1, report.summary()
    assert report.links_refused_by_race == 0
    # A restarted module linking a session destroyed long ago, from stale history: it
    # held only v1, but the session was destroyed before the link was sent.
    view.ended_at_version[A] = 4
    view.destroyed_at[A] = 100.0
    for outcome in ("SESSION_CLOSED", "SESSION_DESTROYED"):
        stale = hooked(HookCall("link", A, M1, wall=150.0, outcome=outcome, known_version=1))
        report = check(view, {"m": [stale]})
        assert report.spurious["link_for_destroyed"] == 1, report.summary()
