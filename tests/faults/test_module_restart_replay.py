"""Scenario 7: a module is SIGKILLed while sessions it holds are destroyed, then
restarted with late redeliveries; its hooks must react to where each session is now,
never to its history.

``sessionctl coordinator`` with two journaling module processes (executor, task-loop)
under a bounded load. The executor holds a set of ACTIVE sessions and is killed. While
it is down: those sessions are destroyed and end by the cleanup timeout (the executor
never unlinks them: they are destroyed with its module session reported orphaned);
others are destroyed with a long cleanup timeout, so they are still in CLEANUP when it
comes back; the load keeps creating sessions that wait for its link. Before the
restart, every event of the held sessions is put into its queue again, some twice, in
shuffled order, on top of what the queue kept from the kill — late, duplicated and
reordered redeliveries.

The new life must: create (once) for each live session that still waits for it; destroy
and unlink (once) each one in CLEANUP; and for each destroyed session neither create,
nor link, nor destroy a second time. The checker's verdict: nothing lost, nothing
applied twice, no spurious hook call.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path

import pytest

from contracts import Codec, SessionStatus, WorkflowConfig
from coordinator.service.relay import event_message
from module_sdk import CoordinatorClient
from tests.faults.harness import end_load_after, process_system, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.checker import check_ownership
from tests.support.load import SessionLoad

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

MODULES = ("executor", "task-loop")
VICTIM = "executor"
DESTROYED = sized(5, 20)  # held by the victim, destroyed (cleanup timeout) while it is down
CLEANING = sized(3, 10)  # held by the victim, still in CLEANUP when it returns
SESSIONS = sized(30, 200)
RATE = sized(4.0, 10.0)
SHORT_CLEANUP = WorkflowConfig(cleanup_timeout_ms=800)
LONG_CLEANUP = WorkflowConfig(cleanup_timeout_ms=120_000)


@pytest.mark.timeout(sized(150, 420))
async def test_restarted_module_reacts_to_the_present_not_to_history(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    rng = random.Random(20261203)
    async with process_system(amqp_url, prefix, tmp_path, MODULES) as system:
        client = system.client
        victim = system.modules[VICTIM]

        async def active(config: WorkflowConfig) -> uuid.UUID:
            sid = (await client.create_workflow_session(["held"], config)).session_id
            await wait_until(
                lambda: _status(client, sid, SessionStatus.ACTIVE),
                timeout=30,
                what=f"session {sid} ACTIVE",
            )
            return sid

        doomed = [await active(SHORT_CLEANUP) for _ in range(DESTROYED)]
        cleaning = [await active(LONG_CLEANUP) for _ in range(CLEANING)]
        load = SessionLoad(
            client,
            sessions=SESSIONS,
            rate=RATE,
            deadline=sized(120, 380),
            config=SHORT_CLEANUP,
            until=asyncio.Event(),
        )
        running = asyncio.create_task(load.run())
        await wait_until(lambda: load.created >= SESSIONS // 3, timeout=60, what="load")
        assert not running.done(), "the kill came after the load, not in the middle"

        await victim.kill()
        killed = time.monotonic()
        for sid in [*doomed, *cleaning]:
            await client.destroy_workflow_session(sid)
        for sid in doomed:  # ended by the cleanup timeout, the victim's link orphaned
            await wait_until(lambda s=sid: _gone(client, s), timeout=30, what=f"{sid} destroyed")
        for sid in cleaning:
            session = await client.get_workflow_session(sid)
            assert session is not None
            assert session.status is SessionStatus.CLEANUP
            assert VICTIM in session.modules
        # Sessions created meanwhile wait for the victim's link.
        await wait_until(
            lambda: load.created >= SESSIONS // 3 + 3, timeout=60, what="load while down"
        )

        # Late redeliveries: every event of the held sessions once more, some twice,
        # shuffled, behind what the queue kept.
        codec = Codec("json")
        again = []
        for sid in [*doomed, *cleaning]:
            history = await client.get_session_history(sid)
            again.extend(history.events)
            again.extend(rng.sample(history.events, k=len(history.events) // 2))
        rng.shuffle(again)
        assert system.transport is not None
        queue = system.topology.module_queue(VICTIM)
        await system.transport.publish_many("", [(queue, event_message(e, codec)) for e in again])

        restarted = time.monotonic()
        await victim.start()
        for sid in cleaning:  # the new life destroys and unlinks what is in CLEANUP
            await wait_until(lambda s=sid: _gone(client, s), timeout=30, what=f"{sid} cleaned")
        result = await end_load_after(load, running, restarted)
        assert result.failures == [], result.failures[:10]

        await system.settle()
        await system.stop()
        report, view = await system.check([*doomed, *cleaning, *result.sessions])
        lives = system.lives(VICTIM)
        assert [life.crashed for life in lives] == [True, False]
        new = lives[1]
        assert report.spurious_hook_count == 0, (report.summary(), report.spurious_hooks[:10])
        hooks = [(h.kind, h.workflow_session) for h in new.hooks]
        for sid in doomed:
            assert [k for k, w in hooks if w == sid] == [], f"hooks for destroyed {sid}"
        for sid in cleaning:
            assert [k for k, w in hooks if w == sid] == ["destroy"], f"{sid}: {hooks}"
        report.assert_ok()
        ownership = check_ownership(view, VICTIM, lives)
        assert ownership.leaked == [], ownership.leaked[:10]

    record(
        Row(
            scenario="7 module SIGKILL while its sessions are destroyed + late redeliveries",
            load=f"{len(result.sessions)} sessions, 2 module processes; {result.describe()}",
            faults=f"SIGKILL of {VICTIM}; {DESTROYED} of its sessions destroyed by the "
            f"cleanup timeout and {CLEANING} put in CLEANUP while down; {len(again)} late, "
            f"duplicated, shuffled redeliveries; hook calls after restart {len(new.hooks)}, "
            f"{report.hooks_repeated_after_crash} repeated after the crash",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"caught up (ready) {seconds([_since(new.ready_at, restarted)])} after "
            f"restart ({restarted - killed:.1f} s down)",
        )
    )


async def _status(client: CoordinatorClient, sid: uuid.UUID, status: SessionStatus) -> bool:
    session = await client.get_workflow_session(sid)
    return session is not None and session.status is status


async def _gone(client: CoordinatorClient, sid: uuid.UUID) -> bool:
    session = await client.get_workflow_session(sid)
    return session is None or session.destroyed


def _since(moment: float | None, start: float) -> float | None:
    return None if moment is None else moment - start
