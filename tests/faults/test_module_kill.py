"""Scenario 4: a module process is killed with SIGKILL mid-load and started again.

``sessionctl coordinator`` with two journaling module processes; the executor is
killed and, after a pause in which sessions wait for its link or its clean-up, started
again. Its new life catches up from the coordinator (links the sessions it missed,
destroys and unlinks those being cleaned up) and consumes what its queue kept. The
checker finds every event covered for every module, none applied twice within a life,
none lost; every module session the executor made is destroyed or reported orphan
(or died with the process that made it before linking it), and every one it linked is
unlinked.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.faults.harness import end_load_after, process_system, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.checker import check_ownership
from tests.support.load import SessionLoad

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

MODULES = ("executor", "task-loop")
VICTIM = "executor"
SESSIONS = sized(60, 400)
RATE = sized(4.0, 10.0)
KILLS = sized(2, 5)
DOWN = 1.5


@pytest.mark.timeout(sized(120, 420))
async def test_killed_module_catches_up_and_cleans_up_what_it_owned(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    async with process_system(amqp_url, prefix, tmp_path, MODULES) as system:
        victim = system.modules[VICTIM]
        load = SessionLoad(
            system.client,
            sessions=SESSIONS,
            rate=RATE,
            deadline=sized(100, 380),
            until=asyncio.Event(),  # more sessions until the last restart is over
        )
        running = asyncio.create_task(load.run())
        restarts: list[float] = []
        for index in range(KILLS):
            await wait_until(
                lambda i=index: load.created >= (i + 1) * SESSIONS // (KILLS + 1),
                timeout=60,
                what=f"load before kill {index + 1}",
            )
            assert not running.done(), "the kill came after the load, not in the middle"
            await victim.kill()
            await asyncio.sleep(DOWN)
            restarts.append(time.monotonic())
            await victim.start()
        result = await end_load_after(load, running, restarts[-1])
        assert result.failures == [], result.failures[:10]
        assert len(result.finished) == len(result.sessions) >= SESSIONS

        await system.settle()
        await system.stop()
        report, view = await system.check(result.sessions)
        report.assert_ok()
        lives = system.lives(VICTIM)
        assert len(lives) == KILLS + 1
        assert [life.crashed for life in lives] == [True] * KILLS + [False]
        ownership = check_ownership(view, VICTIM, lives)
        assert ownership.leaked == [], ownership.leaked[:10]
        assert ownership.linked == len(result.sessions)

    ready = [life.ready_at - restart for life, restart in zip(lives[1:], restarts, strict=True)]  # type: ignore[operator]
    resumed = [
        min((t for t in life.times if t > restart), default=None)
        for life, restart in zip(lives[1:], restarts, strict=True)
    ]
    consumer = [t - r if t is not None else None for t, r in zip(resumed, restarts, strict=True)]
    record(
        Row(
            scenario="4 module SIGKILL + restart",
            load=f"{len(result.sessions)} sessions, 2 module processes; {result.describe()}",
            faults=f"{KILLS} x SIGKILL of {VICTIM}, restarted after {DOWN} s; "
            f"ownership {ownership.summary()}; {report.reapplied_after_crash} events "
            "re-applied by a new life",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"caught up (ready) {seconds(ready)} after restart; "
            f"consumer {seconds(consumer)}",
        )
    )
