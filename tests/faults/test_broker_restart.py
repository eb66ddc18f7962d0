"""Scenario 1: the broker restarts three times in the middle of a load.

On a private RabbitMQ node (``rabbitmqctl stop_app`` / ``start_app``: every connection
is dropped, the listener goes away and comes back; quorum queues and the audit stream
keep what they held), with ``sessionctl coordinator`` and two journaling module
processes. Nobody is told: the coordinator, the modules and the test's client
reconnect by themselves, the consumers come back, and the checker finds every event
applied exactly once per module, in order, and every stored event published.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.faults.harness import end_load_after, process_system, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.load import SessionLoad
from tests.support.private_broker import PrivateBroker

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

MODULES = ("executor", "task-loop")
SESSIONS = sized(60, 400)
RATE = sized(4.0, 12.0)
RESTARTS = 3


@pytest.mark.timeout(sized(150, 400))
async def test_broker_restarted_three_times_mid_load_loses_and_duplicates_nothing(
    private_node: PrivateBroker, private_prefix: str, tmp_path: Path
) -> None:
    async with process_system(private_node.url, private_prefix, tmp_path, MODULES) as system:
        # At least SESSIONS, and more until the last restart is over: on a slow machine
        # a restart takes long enough for the planned sessions to finish first.
        load = SessionLoad(
            system.client,
            sessions=SESSIONS,
            rate=RATE,
            deadline=sized(110, 330),
            until=asyncio.Event(),
        )
        running = asyncio.create_task(load.run())
        outages: list[tuple[float, float]] = []
        walls: list[datetime] = []  # wall-clock bounds of each outage, for diagnosis
        for index in range(RESTARTS):
            await wait_until(
                lambda i=index: load.created >= (i + 1) * SESSIONS // (RESTARTS + 1),
                timeout=60,
                what=f"load before restart {index + 1}",
            )
            assert not running.done(), "the restart came after the load, not in the middle"
            began = time.monotonic()
            walls.append(datetime.now(UTC))
            await asyncio.to_thread(private_node.stop_app)
            await asyncio.sleep(0.5)
            listening = await asyncio.to_thread(private_node.start_app)
            outages.append((began, listening))
            walls.append(datetime.now(UTC))
        result = await end_load_after(load, running, outages[-1][1])
        assert result.failures == [], result.failures[:10]
        assert len(result.finished) == len(result.sessions) >= SESSIONS

        await system.settle()
        await system.stop()
        report, view = await system.check(result.sessions)
        if report.unpublished:
            missing = set(report.unpublished)
            when = [
                (env.position, env.occurred_at.time().isoformat(), env.type)
                for env in view.envelopes
                if env.event_id in missing
            ]
            bounds = [w.time().isoformat() for w in walls]
            raise AssertionError(
                f"{report.summary()}\nunpublished (position, committed, type): {when[:40]}\n"
                f"outages (stop, listening) at {bounds}\ncoordinator:\n"
                f"{system.coordinator.output if system.coordinator else ''}"
            )
        report.assert_ok()
        for module_id in MODULES:
            lives = system.lives(module_id)
            assert len(lives) == 1, f"{module_id} restarted: it should have reconnected"
            assert not lives[0].crashed

    downtimes: list[float | None] = [end - began for began, end in outages]
    commands = [result.first_answer_after(end) for _, end in outages]
    consumers = [system.resumed_after(end) for _, end in outages]
    assert all(c is not None for c in commands), commands
    assert all(c is not None for c in consumers), consumers
    record(
        Row(
            scenario="1 broker restart x3",
            load=f"{len(result.sessions)} sessions, 2 module processes; {result.describe()}",
            faults=f"{RESTARTS} x stop_app/start_app (down {seconds(downtimes)}); "
            f"{report.published_duplicates} events published twice (absorbed)",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"command {seconds(commands)}; consumer {seconds(consumers)}",
        )
    )
