"""The delivery checker: did every module apply every event exactly once, in version
order, with nothing missing — and was everything the store holds published?

Inputs are the coordinator's store (an ``EventStore`` URL, the source of truth) and,
per module, what it applied, in any of the forms the tests have:

- a list of ``(session_id, version)`` in apply order;
- a mapping ``session_id -> [version, …]`` (``ConsumerStats.versions`` of an in-process
  module, or the ``versions`` of a ``tests.support.module_process`` JSON report);
- a list of ``Incarnation``s: one per life of a module process, read from a
  ``tests.support.journal_module`` journal (``read_journal``). An incarnation knows
  the versions it was given by the coordinator at start (``baseline``: in its state
  without being applied one by one) and whether it ended by a crash.

Rules, per module and session (``final`` is the session's last stored version):

- within one incarnation, versions are applied in increasing order, each at most once,
  without a hole, from ``baseline + 1`` (1 for a session it did not know at start);
- across incarnations, the versions applied or in a baseline cover ``1..final``
  (nothing lost), and none is applied in two incarnations unless the earlier one
  crashed (a process killed before it acked loses its memory with it, and gets the
  event again: that is counted as ``reapplied_after_crash``, never as a duplicate);
- nothing is applied that the store does not have; an event journaled with its id must
  be the one the store holds at that (session, version) (``mismatched`` otherwise), and
  a registry event (a module's orphan clean-up request, identified by its event id
  only) is applied at most once per life.

Hook calls (``HookCall``, journaled by ``journal_module``) are checked against the
store too; each of these is a spurious hook call, counted by kind and required to be 0:

- ``create_for_destroyed``: ``on_create`` called after the store destroyed the
  workflow session;
- ``create_twice``: ``on_create`` called a second time for one workflow session;
- ``destroy_twice``: ``on_destroy`` called a second time for one workflow session;
- ``link_for_destroyed``: a link sent after the session was destroyed, or refused
  because it was destroyed, or sent for a session the module already held as over
  (its ``known_version`` at or past the event that ended the session's live
  statuses). A link refused as ``SESSION_CLOSED`` for a session that ended, but was
  not destroyed, while the module still held it live (it failed by a link timeout
  during a network cut, say) is a race the module handles (it destroys what it made):
  counted as ``links_refused_by_race``, not spurious; where the journal does not say
  what the module held, that refusal counts as spurious too.

A second create or destroy in a life after one that crashed is not spurious (the new
life cannot know what the killed one did before its acknowledgement): it is counted
as ``hooks_repeated_after_crash``. "After the store destroyed the session" compares a
hook's ``time.time()`` with the ``Destroyed`` event's ``occurred_at``: both are this
machine's wall clock as long as the coordinator runs on its real clock (no fault test
gives it a manual one).

The published stream (the audit stream, read with ``read_published``) must hold every
stored event id; duplicates there are expected under faults and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts import (
    REGISTRY_ID,
    Destroyed,
    Linked,
    OrphanReported,
    SessionStatus,
    StatusChanged,
    Topology,
    Unlinked,
    verify_chain_raw,
)
from coordinator.store.eventstore import EventStore
from transport.audit import read_audit_stream
from transport.port import Transport

__all__ = [
    "SPURIOUS_KINDS",
    "CheckReport",
    "HookCall",
    "Incarnation",
    "Ownership",
    "StoreView",
    "check",
    "check_ownership",
    "read_journal",
    "read_published",
    "read_store",
]


# The kinds of spurious hook call the checker counts (see the module docstring).
SPURIOUS_KINDS = ("create_for_destroyed", "create_twice", "destroy_twice", "link_for_destroyed")

# Link refusals that mean the module linked a session it should have known was over.
_LINK_TOO_LATE = frozenset({"SESSION_DESTROYED", "SESSION_CLOSED"})
# The statuses in which a workflow session still takes links.
_LIVE = frozenset({SessionStatus.INITIALIZING, SessionStatus.ACTIVE, SessionStatus.PAUSED})


@dataclass(frozen=True)
class HookCall:
    """One call a module made on behalf of a workflow session: its ``on_create``
    (``create``), its ``on_destroy`` (``destroy``), or its link command (``link``, with
    ``outcome`` ``ok`` or the refusal's error code). ``wall`` is ``time.time()`` at the
    call: the clock the coordinator stamps events with on this machine."""

    kind: str
    workflow_session: uuid.UUID
    module_session: uuid.UUID | None = None
    wall: float | None = None
    outcome: str | None = None
    # The session's version the module held when it made the call (links only).
    known_version: int | None = None


@dataclass(frozen=True)
class Incarnation:
    """One life of a module: what it applied in order, what it knew at start."""

    applied: Sequence[tuple[uuid.UUID, int]]
    baseline: Mapping[uuid.UUID, int] = field(default_factory=dict)
    crashed: bool = False
    made: Sequence[tuple[uuid.UUID, uuid.UUID]] = ()  # (workflow session, module session)
    destroyed: Sequence[uuid.UUID] = ()  # module sessions
    times: Sequence[float] = ()  # monotonic time of each apply, parallel to ``applied``
    started_at: float | None = None
    ready_at: float | None = None
    # The event id of each applied event, parallel to ``applied`` (empty: not known).
    event_ids: Sequence[uuid.UUID | None] = ()
    registry: Sequence[uuid.UUID] = ()  # registry events applied, by event id
    hooks: Sequence[HookCall] = ()


@dataclass
class StoreView:
    """What the store holds, read once."""

    versions: dict[uuid.UUID, list[int]]  # session -> versions in stored order
    event_ids: list[uuid.UUID]  # every stored event, registry included
    envelopes: list[Any]
    chains_bad: dict[uuid.UUID, str]
    # (session, version) -> event id, and when each destroyed session was destroyed
    # (seconds since the epoch); derived from ``envelopes`` when not given.
    ids_at: dict[tuple[uuid.UUID, int], uuid.UUID] = field(default_factory=dict)
    destroyed_at: dict[uuid.UUID, float] = field(default_factory=dict)
    # The version at which each session that ended left its live statuses (went to
    # COMPLETED, FAILED, CANCELLED or CLEANUP, or was destroyed).
    ended_at_version: dict[uuid.UUID, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for env in self.envelopes:
            if env.session_id == REGISTRY_ID:
                continue
            self.ids_at.setdefault((env.session_id, env.version), env.event_id)
            if isinstance(env.event, Destroyed):
                self.destroyed_at.setdefault(env.session_id, env.occurred_at.timestamp())
            if isinstance(env.event, Destroyed) or (
                isinstance(env.event, StatusChanged)
                and env.event.module_id is None
                and env.event.new_status not in _LIVE
            ):
                self.ended_at_version.setdefault(env.session_id, env.version)

    @classmethod
    def read(cls, store_url: str, *, verify_chains: bool = True) -> StoreView:
        versions: dict[uuid.UUID, list[int]] = {}
        ids: list[uuid.UUID] = []
        envelopes: list[Any] = []
        bad: dict[uuid.UUID, str] = {}
        with EventStore(store_url) as store:
            for page in store.iter_all():
                for env in page:
                    ids.append(env.event_id)
                    envelopes.append(env)
                    if env.session_id != REGISTRY_ID:
                        versions.setdefault(env.session_id, []).append(env.version)
            if verify_chains:
                for sid in versions:
                    verdict = verify_chain_raw(store.raw_history(sid))
                    if not verdict.ok:
                        bad[sid] = f"version {verdict.first_bad_version}: {verdict.reason}"
        return cls(versions, ids, envelopes, bad)

    def final(self, sid: uuid.UUID) -> int:
        return max(self.versions.get(sid, [0]))


@dataclass
class CheckReport:
    sessions: int = 0
    stored_events: int = 0
    events_checked: int = 0  # stored session events x modules that should see them
    applied: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    store_problems: list[str] = field(default_factory=list)
    reapplied_after_crash: int = 0
    mismatched: list[str] = field(default_factory=list)  # applied id != stored id
    hook_calls: int = 0
    spurious_hooks: list[str] = field(default_factory=list)  # "kind: detail"
    spurious: Counter[str] = field(default_factory=Counter)  # kind -> count
    hooks_repeated_after_crash: int = 0
    links_refused_by_race: int = 0
    published: int | None = None
    published_duplicates: int = 0
    unpublished: list[uuid.UUID] = field(default_factory=list)
    unpublished_positions: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.out_of_order
            or self.phantom
            or self.store_problems
            or self.unpublished
            or self.mismatched
            or self.spurious_hooks
        )

    @property
    def spurious_hook_count(self) -> int:
        return len(self.spurious_hooks)

    def summary(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "stored_events": self.stored_events,
            "events_checked": self.events_checked,
            "applied": self.applied,
            "lost": len(self.lost),
            "duplicated_applied": len(self.duplicated),
            "out_of_order": len(self.out_of_order),
            "reapplied_after_crash": self.reapplied_after_crash,
            "mismatched": len(self.mismatched),
            "hook_calls": self.hook_calls,
            "spurious_hooks": len(self.spurious_hooks),
            **{kind: self.spurious[kind] for kind in SPURIOUS_KINDS},
            "hooks_repeated_after_crash": self.hooks_repeated_after_crash,
            "links_refused_by_race": self.links_refused_by_race,
            "published": self.published,
            "published_duplicates": self.published_duplicates,
            "unpublished": len(self.unpublished),
        }

    def assert_ok(self) -> None:
        if self.ok:
            return
        lines = [f"delivery check failed: {self.summary()}"]
        for name in (
            "store_problems",
            "lost",
            "duplicated",
            "out_of_order",
            "phantom",
            "mismatched",
            "spurious_hooks",
        ):
            items: list[str] = getattr(self, name)
            if items:
                lines.append(f"{name} ({len(items)}):")
                lines.extend(f"  {item}" for item in items[:20])
        if self.unpublished:
            lines.append(
                f"unpublished ({len(self.unpublished)}) at store positions "
                f"{self.unpublished_positions[:40]}: {self.unpublished[:5]}"
            )
        raise AssertionError("\n".join(lines))


def _incarnations(applied: Any) -> list[Incarnation]:
    if isinstance(applied, Incarnation):
        return [applied]
    if isinstance(applied, Mapping):
        pairs = [(sid, v) for sid, versions in applied.items() for v in versions]
        return [Incarnation(applied=[(_uuid(s), int(v)) for s, v in pairs])]
    items = list(applied)
    if items and all(isinstance(i, Incarnation) for i in items):
        return items
    return [Incarnation(applied=[(_uuid(s), int(v)) for s, v in items])]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _runs(versions: Iterable[int]) -> str:
    values = list(versions)
    return ",".join(map(str, values)) if len(values) <= 12 else f"{values[:6]}…{values[-3:]}"


def check(
    store: str | StoreView,
    applied: Mapping[str, Any],
    *,
    sessions: Iterable[uuid.UUID] | None = None,
    published: Counter[uuid.UUID] | None = None,
) -> CheckReport:
    """Check what each module applied against the store (see the module docstring).
    ``sessions`` limits the module check to those sessions (each must be in the store);
    by default every session in the store is checked."""
    view = store if isinstance(store, StoreView) else StoreView.read(store)
    report = CheckReport(stored_events=len(view.event_ids))
    targets = list(view.versions) if sessions is None else list(sessions)
    report.sessions = len(targets)
    for sid, versions in view.versions.items():
        if versions != list(range(1, len(versions) + 1)):
            report.store_problems.append(f"{sid}: stored versions {_runs(versions)}")
    for sid, reason in view.chains_bad.items():
        report.store_problems.append(f"{sid}: hash chain broken at {reason}")
    for sid in targets:
        if sid not in view.versions:
            report.store_problems.append(f"{sid}: not in the store")
    for module_id, raw in applied.items():
        lives = _incarnations(raw)
        report.applied += sum(len(life.applied) for life in lives)
        _check_ids(view, module_id, lives, report)
        _check_hooks(view, module_id, lives, report)
        per_life: list[dict[uuid.UUID, list[int]]] = []
        for life in lives:
            by_session: dict[uuid.UUID, list[int]] = {}
            for sid, version in life.applied:
                by_session.setdefault(sid, []).append(version)
            per_life.append(by_session)
        for sid in targets:
            final = view.final(sid)
            report.events_checked += final
            covered: Counter[int] = Counter()
            seen_in: dict[int, int] = {}
            for index, (life, by_session) in enumerate(zip(lives, per_life, strict=True)):
                got = by_session.get(sid, [])
                base = life.baseline.get(sid, 0)
                where = f"{module_id} (life {index + 1}) session {sid}"
                counts = Counter(got)
                twice = sorted(v for v, n in counts.items() if n > 1)
                if twice:
                    report.duplicated.append(f"{where}: applied {twice} more than once")
                if any(b <= a for a, b in itertools.pairwise(got)):
                    report.out_of_order.append(f"{where}: applied {_runs(got)}")
                too_high = sorted(v for v in counts if v > final or v < 1)
                if too_high:
                    report.phantom.append(f"{where}: applied {too_high}, store ends at {final}")
                at_or_below = sorted(v for v in counts if v <= base)
                if at_or_below:
                    report.duplicated.append(
                        f"{where}: applied {at_or_below}, already in its start state (v{base})"
                    )
                if got and not twice and got == sorted(got):
                    expected = list(range(base + 1, base + 1 + len(got)))
                    if got != expected:
                        report.lost.append(
                            f"{where}: applied {_runs(got)}, expected a run from v{base + 1}"
                        )
                for version in counts:
                    if version in seen_in:
                        if lives[seen_in[version]].crashed:
                            report.reapplied_after_crash += 1
                        else:
                            report.duplicated.append(
                                f"{module_id} session {sid}: v{version} applied in life "
                                f"{seen_in[version] + 1} (which did not crash) and {index + 1}"
                            )
                    seen_in[version] = index
                covered.update(set(counts) | set(range(1, base + 1)))
            missing = [v for v in range(1, final + 1) if v not in covered]
            if missing:
                report.lost.append(
                    f"{module_id} session {sid}: never applied {_runs(missing)} of 1..{final}"
                )
    if published is not None:
        report.published = sum(published.values())
        report.published_duplicates = sum(n - 1 for n in published.values() if n > 1)
        report.unpublished = [eid for eid in view.event_ids if eid not in published]
        absent = set(report.unpublished)
        report.unpublished_positions = [
            env.position for env in view.envelopes if env.event_id in absent
        ]
    return report


def _check_ids(
    view: StoreView, module_id: str, lives: Sequence[Incarnation], report: CheckReport
) -> None:
    """Each applied event is the stored one at its (session, version); each registry
    event is a stored one, applied once per life (and once overall unless a life
    crashed before acknowledging it)."""
    stored = set(view.event_ids)
    registry_seen: dict[uuid.UUID, int] = {}
    for index, life in enumerate(lives):
        where = f"{module_id} (life {index + 1})"
        for (sid, version), eid in zip(life.applied, life.event_ids, strict=False):
            expected = view.ids_at.get((sid, version))
            if eid is not None and expected is not None and eid != expected:
                report.mismatched.append(
                    f"{where} session {sid} v{version}: applied event {eid}, "
                    f"the store holds {expected}"
                )
        for eid, count in Counter(life.registry).items():
            if eid not in stored:
                report.phantom.append(f"{where}: applied registry event {eid}, not stored")
            if count > 1:
                report.duplicated.append(f"{where}: registry event {eid} applied {count} times")
            earlier = registry_seen.get(eid)
            if earlier is not None:
                if lives[earlier].crashed:
                    report.reapplied_after_crash += 1
                else:
                    report.duplicated.append(
                        f"{module_id}: registry event {eid} applied in life {earlier + 1} "
                        f"(which did not crash) and {index + 1}"
                    )
            registry_seen[eid] = index


def _check_hooks(
    view: StoreView, module_id: str, lives: Sequence[Incarnation], report: CheckReport
) -> None:
    """Count spurious hook calls (see the module docstring)."""

    def spurious(kind: str, detail: str) -> None:
        report.spurious[kind] += 1
        report.spurious_hooks.append(f"{kind}: {module_id} {detail}")

    # (kind, workflow session) -> the life that last called it
    earlier: dict[tuple[str, uuid.UUID], int] = {}
    for index, life in enumerate(lives):
        report.hook_calls += len(life.hooks)
        in_life: Counter[tuple[str, uuid.UUID]] = Counter()
        for hook in life.hooks:
            wsid = hook.workflow_session
            where = f"(life {index + 1}) session {wsid}"
            ended = view.destroyed_at.get(wsid)
            late = ended is not None and hook.wall is not None and hook.wall > ended
            if hook.kind == "link":
                ended_at = view.ended_at_version.get(wsid)
                knew = (
                    hook.known_version is not None
                    and ended_at is not None
                    and hook.known_version >= ended_at
                )
                if knew or late or hook.outcome == "SESSION_DESTROYED":
                    spurious(
                        "link_for_destroyed",
                        f"{where}: link {hook.outcome or 'sent'} (held v{hook.known_version}, "
                        f"the session ended at v{ended_at})",
                    )
                elif hook.outcome in _LINK_TOO_LATE:
                    if hook.known_version is None:
                        # The journal does not say what the module held: assume it knew.
                        spurious("link_for_destroyed", f"{where}: link {hook.outcome}")
                    else:
                        report.links_refused_by_race += 1
                continue
            if hook.kind not in ("create", "destroy"):
                continue
            if hook.kind == "create" and late:
                spurious("create_for_destroyed", f"{where}: created {hook.module_session}")
            key = (hook.kind, wsid)
            in_life[key] += 1
            if in_life[key] > 1:
                spurious(f"{hook.kind}_twice", f"{where}: {hook.kind} #{in_life[key]} in one life")
            elif key in earlier:
                if lives[earlier[key]].crashed:
                    report.hooks_repeated_after_crash += 1
                else:
                    spurious(
                        f"{hook.kind}_twice",
                        f"{where}: {hook.kind} again after life {earlier[key] + 1} "
                        "(which did not crash)",
                    )
            earlier[key] = index


async def read_published(
    transport: Transport, topology: Topology, *, idle_seconds: float = 2.0
) -> Counter[uuid.UUID]:
    """How many times each event id is in the audit stream (what the relay published)."""
    seen: Counter[uuid.UUID] = Counter()
    async for item in read_audit_stream(transport, topology, idle_seconds=idle_seconds):
        if isinstance(item, Exception):
            raise TypeError(f"undecodable entry in the audit stream: {item}")
        seen[item.event_id] += 1
    return seen


def read_journal(path: Path) -> list[Incarnation]:
    """The incarnations of a ``journal_module`` journal, oldest first. One without a
    ``stop`` line ended by a crash."""
    lives: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record["k"]
        if kind == "start":
            lives.append(
                {
                    "applied": [],
                    "times": [],
                    "baseline": {},
                    "made": [],
                    "destroyed": [],
                    "stopped": False,
                    "started_at": record.get("t"),
                    "ready_at": None,
                    "event_ids": [],
                    "registry": [],
                    "hooks": [],
                }
            )
            continue
        life = lives[-1]
        if kind == "a":
            life["applied"].append((uuid.UUID(record["s"]), int(record["v"])))
            life["times"].append(float(record["t"]))
            life["event_ids"].append(uuid.UUID(record["e"]) if "e" in record else None)
        elif kind == "r":
            life["registry"].append(uuid.UUID(record["e"]))
        elif kind == "baseline":
            life["baseline"] = {uuid.UUID(k): int(v) for k, v in record["v"].items()}
        elif kind == "made":
            life["made"].append((uuid.UUID(record["w"]), uuid.UUID(record["m"])))
            life["hooks"].append(_hook("create", record))
        elif kind == "destroyed":
            life["destroyed"].append(uuid.UUID(record["m"]))
            life["hooks"].append(_hook("destroy", record))
        elif kind == "link":
            life["hooks"].append(_hook("link", record))
        elif kind == "ready":
            life["ready_at"] = record.get("t")
        elif kind == "stop":
            life["stopped"] = True
    return [
        Incarnation(
            applied=life["applied"],
            baseline=life["baseline"],
            crashed=not life["stopped"],
            made=life["made"],
            destroyed=life["destroyed"],
            times=life["times"],
            started_at=life["started_at"],
            ready_at=life["ready_at"],
            event_ids=life["event_ids"],
            registry=life["registry"],
            hooks=life["hooks"],
        )
        for life in lives
    ]


def _hook(kind: str, record: Mapping[str, Any]) -> HookCall:
    return HookCall(
        kind=kind,
        workflow_session=uuid.UUID(record["w"]),
        module_session=uuid.UUID(record["m"]) if record.get("m") else None,
        wall=record.get("wt"),
        outcome=record.get("r"),
        known_version=record.get("kv"),
    )


@dataclass
class Ownership:
    """What became of the module sessions one module made."""

    made: int = 0
    linked: int = 0
    destroyed: int = 0
    orphan_reported: int = 0
    died_with_process: int = 0  # made by a crashed life, never linked: gone with it
    leaked: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "made": self.made,
            "linked": self.linked,
            "destroyed": self.destroyed,
            "orphan_reported": self.orphan_reported,
            "died_with_process": self.died_with_process,
            "leaked": len(self.leaked),
        }


def check_ownership(
    store: str | StoreView, module_id: str, lives: Sequence[Incarnation]
) -> Ownership:
    """Every module session the module made is destroyed by it (in some life) or
    reported orphan by the coordinator; every one it linked is unlinked or reported
    orphan in the store. A module session made by a life that crashed before linking
    it is counted as gone with the process (nobody else can know of it)."""
    view = store if isinstance(store, StoreView) else StoreView.read(store)
    linked: dict[uuid.UUID, uuid.UUID] = {}  # module session -> workflow session
    released: set[uuid.UUID] = set()
    orphaned: set[uuid.UUID] = set()
    for env in view.envelopes:
        event = env.event
        if isinstance(event, Linked) and event.module_id == module_id:
            linked[event.module_session_id] = env.session_id
        elif isinstance(event, Unlinked) and event.module_id == module_id:
            released.add(event.module_session_id)
        elif isinstance(event, Destroyed) and module_id in event.orphaned:
            orphaned.add(event.orphaned[module_id])
        elif isinstance(event, OrphanReported) and event.module_id == module_id:
            orphaned.add(event.module_session_id)
    result = Ownership()
    destroyed = {m for life in lives for m in life.destroyed}
    result.linked = len(linked)
    for msid, wsid in linked.items():
        if msid not in released and msid not in orphaned:
            result.leaked.append(f"{module_id} session {msid} of {wsid}: linked, never unlinked")
    for life in lives:
        for wsid, msid in life.made:
            result.made += 1
            if msid in destroyed:
                result.destroyed += 1
            elif msid in orphaned:
                result.orphan_reported += 1
            elif life.crashed and msid not in linked:
                result.died_with_process += 1
            else:
                result.leaked.append(
                    f"{module_id} session {msid} of {wsid}: made, never destroyed or "
                    "reported orphan"
                )
    return result


async def read_store(store_url: str) -> StoreView:
    """``StoreView.read`` off the event loop."""
    return await asyncio.to_thread(StoreView.read, store_url)
