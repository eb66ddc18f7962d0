"""The operators' session listing (``ListWorkflowSessions`` with filters, keyset pages in
both orders) against a brute-force model of the same question, while sessions are
created out of order, in the same microsecond, and destroyed between pages: the
creation-order index a projection keeps gives exactly the pages a full sort would."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from contracts import (
    ErrorCode,
    ListWorkflowSessions,
    ModuleSessionInfo,
    SessionsCursor,
    SessionStatus,
    StandardError,
    WorkflowSession,
)
from coordinator.domain.compact import micros
from coordinator.read.projections import Projections

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = [SessionStatus.INITIALIZING, SessionStatus.ACTIVE, SessionStatus.PAUSED]


def make(rng: random.Random, n: int) -> WorkflowSession:
    sid = uuid.UUID(int=rng.getrandbits(128))
    # Mostly increasing, sometimes earlier than the last one, sometimes the same tick.
    created = T0 + timedelta(microseconds=n * 1000 - rng.choice([0, 0, 0, 1500, 1000]))
    modules = {}
    if rng.random() < 0.5:
        module_sid = uuid.UUID(int=rng.getrandbits(128))
        modules["executor"] = ModuleSessionInfo(
            module_id="executor",
            session_id=module_sid,
            linked_workflow_session_id=sid,
            status=SessionStatus.ACTIVE,
            created_at=created,
            last_activity=created,
        )
    if rng.random() < 0.03:
        # A module few sessions use: its filter is read from its own set, not walked.
        modules["streamer"] = ModuleSessionInfo(
            module_id="streamer",
            session_id=uuid.UUID(int=rng.getrandbits(128)),
            linked_workflow_session_id=sid,
            status=SessionStatus.ACTIVE,
            created_at=created,
            last_activity=created,
        )
    failure = (
        StandardError(code=ErrorCode.MODULE_ERROR, message="x") if rng.random() < 0.2 else None
    )
    return WorkflowSession(
        session_id=sid,
        status=rng.choice(STATUSES),
        created_at=created,
        last_activity=created + timedelta(seconds=rng.randint(0, 100)),
        modules=modules,
        failure=failure,
        version=1,
    )


def put(proj: Projections, state: WorkflowSession) -> None:
    proj.sessions.put(state)
    proj.by_status[state.status].add(state.session_id)
    for module_id in state.modules:
        proj.by_module.setdefault(module_id, set()).add(state.session_id)


def drop(proj: Projections, state: WorkflowSession) -> None:
    proj.sessions.pop(state.session_id)
    proj.by_status[state.status].discard(state.session_id)
    for module_id in state.modules:
        proj.by_module[module_id].discard(state.session_id)


def expected(
    live: dict[uuid.UUID, WorkflowSession], q: ListWorkflowSessions
) -> list[WorkflowSession]:
    """Every page of ``q`` as the brute force finds them, concatenated."""
    out = []
    for s in live.values():
        if q.status is not None and s.status is not q.status:
            continue
        if q.module_id is not None and q.module_id not in s.modules:
            continue
        if q.created_from is not None and s.created_at < q.created_from:
            continue
        if q.created_to is not None and s.created_at >= q.created_to:
            continue
        if q.has_errors and s.failure is None:
            continue
        if q.idle_since is not None and s.last_activity > q.idle_since:
            continue
        ids = {s.session_id, *(m.session_id for m in s.modules.values())}
        if q.match_id is not None and q.match_id not in ids:
            continue
        out.append(s)
    out.sort(key=lambda s: (micros(s.created_at), s.session_id), reverse=q.newest_first)
    return out


def walk(proj: Projections, q: ListWorkflowSessions) -> list[WorkflowSession]:
    """Every page by keyset cursor."""
    got: list[WorkflowSession] = []
    after: SessionsCursor | None = None
    while True:
        page = proj.sessions_page(q.status, q.module_id, 0, q.limit, after, query=q)
        got += page.sessions
        if page.next_after is None:
            return got
        after = page.next_after


@pytest.mark.parametrize("seed", range(6))
def test_filtered_keyset_pages_match_a_brute_force_listing(seed: int) -> None:
    rng = random.Random(seed)
    proj = Projections()
    live: dict[uuid.UUID, WorkflowSession] = {}
    for n in range(400):
        state = make(rng, n)
        put(proj, state)
        live[state.session_id] = state
        if n % 97 == 0:
            proj.sessions.compact()  # packed and unpacked states alike
    linked = [s for s in live.values() if s.modules]
    queries = [
        ListWorkflowSessions(limit=7),
        ListWorkflowSessions(limit=7, newest_first=True),
        ListWorkflowSessions(limit=5, status=SessionStatus.ACTIVE, newest_first=True),
        ListWorkflowSessions(limit=5, module_id="executor"),
        ListWorkflowSessions(limit=3, has_errors=True, newest_first=True),
        ListWorkflowSessions(limit=4, idle_since=T0 + timedelta(seconds=50)),
        ListWorkflowSessions(
            limit=6,
            created_from=T0 + timedelta(milliseconds=100),
            created_to=T0 + timedelta(milliseconds=200),
            newest_first=True,
        ),
        ListWorkflowSessions(limit=2, match_id=linked[0].modules["executor"].session_id),
        ListWorkflowSessions(limit=2, module_id="streamer"),
        ListWorkflowSessions(limit=3, module_id="streamer", newest_first=True),
        ListWorkflowSessions(
            limit=1, module_id="streamer", status=SessionStatus.ACTIVE, has_errors=False
        ),
        ListWorkflowSessions(
            limit=2,
            module_id="streamer",
            created_from=T0 + timedelta(milliseconds=50),
            created_to=T0 + timedelta(milliseconds=300),
            newest_first=True,
        ),
        ListWorkflowSessions(limit=2, match_id=linked[1].session_id),
    ]
    for round_ in range(3):
        for q in queries:
            assert walk(proj, q) == expected(live, q), (round_, q)
        # Between rounds: some destroyed, some created (the index catches up).
        for state in rng.sample(list(live.values()), 60):
            drop(proj, state)
            del live[state.session_id]
        # Many at once, then a few: the index catches up by a sort, then by insertion.
        for n in range(400 + round_ * 100, 400 + round_ * 100 + (100 if round_ % 2 else 30)):
            state = make(rng, n)
            put(proj, state)
            live[state.session_id] = state


def test_sessions_destroyed_between_pages_shift_no_other() -> None:
    rng = random.Random(7)
    proj = Projections()
    states = [make(rng, n) for n in range(50)]
    for state in states:
        put(proj, state)
    ordered = sorted(states, key=lambda s: (micros(s.created_at), s.session_id), reverse=True)
    q = ListWorkflowSessions(limit=10, newest_first=True)
    first = proj.sessions_page(None, None, 0, 10, None, query=q)
    assert first.sessions == ordered[:10]
    for state in [*first.sessions[:3], first.sessions[-1], ordered[30]]:
        drop(proj, state)
    rest: list[WorkflowSession] = []
    after = first.next_after
    while after is not None:
        page = proj.sessions_page(None, None, 0, 10, after, query=q)
        rest += page.sessions
        after = page.next_after
    assert rest == [s for s in ordered[10:] if s is not ordered[30]]
