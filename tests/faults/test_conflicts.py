"""Scenario 6: conflicting commands on one session, raced from several clients.

Four clients, each on a broker connection of its own, race on every one of a batch of
sessions: to link the same module with different module sessions; to move the session
to COMPLETED, CANCELLED, PAUSED, FAILED and ACTIVE at once; to destroy it; to unlink
the module. Whatever order the coordinator takes them in: exactly one link wins; the
session goes through a path the transition table allows, with at most one terminal
status; every acknowledged command left its event (no lost update) or was a no-op,
every refused one left nothing, with a typed error; exactly one Destroyed; the hash
chains verify; and an observer module applied every event once, in order.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from pathlib import Path

import pytest

from contracts import (
    TERMINAL_STATUSES,
    TRANSITIONS,
    Command,
    CreateWorkflowSession,
    DestroyWorkflowSession,
    ErrorCode,
    LinkModuleSession,
    SessionStatus,
    StatusChanged,
    UnlinkModuleSession,
    UpdateSessionStatus,
    WorkflowConfig,
    WorkflowSession,
    new_id,
)
from module_sdk import CommandFailed, CoordinatorClient
from tests.faults.harness import inprocess_system
from tests.faults.report import Row, record
from tests.faults.sizes import sized
from tests.support.journal_module import JournalModule

pytestmark = [pytest.mark.faults, pytest.mark.broker]

S = SessionStatus
SESSIONS = sized(30, 300)
CLIENTS = 4
RACED = (S.COMPLETED, S.CANCELLED, S.PAUSED, S.FAILED, S.ACTIVE, S.PAUSED)


class Observer(JournalModule):
    required = False

    def should_join(self, session: WorkflowSession) -> bool:
        return False


class Outcomes:
    """Every raced command: its id, and the answer it got."""

    def __init__(self) -> None:
        self.accepted: dict[uuid.UUID, Command] = {}
        self.refused: dict[uuid.UUID, tuple[Command, ErrorCode]] = {}

    async def send(self, client: CoordinatorClient, command: Command) -> bool:
        command_id = new_id()
        try:
            await client.call(command, command_id=command_id)
        except CommandFailed as exc:
            self.refused[command_id] = (command, exc.code)
            return False
        self.accepted[command_id] = command
        return True


async def race(outcomes: Outcomes, sends: list[tuple[CoordinatorClient, Command]]) -> list[bool]:
    return list(await asyncio.gather(*(outcomes.send(c, cmd) for c, cmd in sends)))


@pytest.mark.timeout(sized(90, 400))
async def test_racing_clients_get_one_outcome_and_no_lost_update(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with inprocess_system(amqp_url, prefix, tmp_path, request.node.nodeid[-120:]) as system:
        runtime = await system.start_coordinator()
        observer = await system.add_module("observer", cls=Observer, register=False)
        clients = [await system.client(f"client {i}", timeout=5.0) for i in range(CLIENTS)]
        await clients[0].register_module("racer", required=False)
        outcomes = Outcomes()
        link_wins: Counter[uuid.UUID] = Counter()

        async def one(index: int) -> uuid.UUID:
            sid = new_id()
            config = WorkflowConfig(required_modules=["racer"])
            assert await outcomes.send(
                clients[index % CLIENTS],
                CreateWorkflowSession(session_id=sid, steps=["s"], config=config),
            )
            wins = await race(
                outcomes,
                [
                    (
                        c,
                        LinkModuleSession(
                            session_id=sid, module_id="racer", module_session_id=new_id()
                        ),
                    )
                    for c in clients
                ],
            )
            link_wins[sid] = sum(wins)
            statuses = [
                (clients[i % CLIENTS], UpdateSessionStatus(session_id=sid, status=s))
                for i, s in enumerate(RACED)
            ]
            rotate = index % len(statuses)
            await race(outcomes, statuses[rotate:] + statuses[:rotate])
            await race(outcomes, [(c, DestroyWorkflowSession(session_id=sid)) for c in clients[:3]])
            await race(
                outcomes,
                [(c, UnlinkModuleSession(session_id=sid, module_id="racer")) for c in clients[:2]],
            )
            return sid

        sids = list(await asyncio.gather(*(one(i) for i in range(SESSIONS))))
        for sid in sids:
            state = await clients[1].get_workflow_session(sid)
            assert state is None or state.destroyed, state
        await system.settle()
        report = await system.check(sids)
        report.assert_ok()
        store = runtime.coordinator.store
        assert store is not None
        histories = {sid: await asyncio.to_thread(store.history, sid) for sid in sids}

    assert all(link_wins[sid] == 1 for sid in sids), link_wins
    caused: Counter[uuid.UUID] = Counter()
    terminal_total = 0
    for sid, history in histories.items():
        for env in history:
            if env.causation_id is not None:
                caused[env.causation_id] += 1
        path = [
            e.event
            for e in history
            if isinstance(e.event, StatusChanged) and e.event.module_id is None
        ]
        for change in path:
            assert change.new_status in TRANSITIONS[change.old_status], (sid, path)
        for before, after in itertools.pairwise(path):
            assert after.old_status is before.new_status, (sid, path)
        terminal = [c for c in path if c.new_status in TERMINAL_STATUSES]
        assert len(terminal) <= 1, (sid, path)
        terminal_total += len(terminal)
        assert [e.type for e in history].count("session.destroyed") == 1
        assert [e.type for e in history].count("session.linked") == 1
        assert history[-1].type == "session.destroyed"
        reached = {S.ACTIVE} | {c.new_status for c in path}
        for command_id, command in outcomes.accepted.items():
            if getattr(command, "session_id", None) != sid:
                continue
            if isinstance(command, UpdateSessionStatus) and not caused[command_id]:
                # Accepted without an event: only as a no-op, to a status it had.
                assert command.status in reached, (sid, command, path)
    # No lost update: an accepted status change to a new status left its event.
    for command_id, command in outcomes.accepted.items():
        if isinstance(command, LinkModuleSession | CreateWorkflowSession):
            assert caused[command_id] >= 1, command
    # Nothing refused left a trace, and each refusal was typed.
    for command_id, (command, code) in outcomes.refused.items():
        assert caused[command_id] == 0, command
        assert code in {
            ErrorCode.INVALID_TRANSITION,
            ErrorCode.MODULE_ALREADY_LINKED,
            ErrorCode.SESSION_CLOSED,
            ErrorCode.SESSION_DESTROYED,
        }, (command, code)
    assert terminal_total > 0
    codes = Counter(code.value for _, code in outcomes.refused.values())
    record(
        Row(
            scenario="6 conflicting commands",
            load=f"{SESSIONS} sessions x {CLIENTS} clients (own connections), "
            f"{len(outcomes.accepted) + len(outcomes.refused)} raced commands",
            faults=f"link x4, status x{len(RACED)}, destroy x3, unlink x2 per session; "
            f"{len(outcomes.accepted)} accepted, refused {dict(codes)}; "
            f"{terminal_total} terminal transitions; observer applied "
            f"{observer.consumer.stats.applied} events",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery="n/a (no outage)",
        )
    )
