"""Scenario 3: the coordinator process is killed with SIGKILL mid-relay, five times.

``sessionctl coordinator`` on a SQLite store with two journaling module processes,
under load. Each kill comes at one of the relay's two dangerous moments, best effort
by timing: right after a command was acknowledged (committed; its events may not be
published yet) or right after an event reached the test's tap on the events exchange
(published; the relay may not have saved its position yet). Each time the
coordinator is started again at once, resumes from the store, republishes from its
saved position, and answers the retried commands from their command ids. The checker
finds every event applied exactly once per module and every stored event published;
the duplicates the restarts publish are counted, and absorbed by the modules.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from contracts import HEADERS, Command, Topology
from contracts.topology import QueueSpec
from coordinator.service.relay import relay_checkpoint
from coordinator.store.eventstore import EventStore
from tests.faults.harness import end_load_after, process_system, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.load import SessionLoad
from transport.port import Delivery

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

MODULES = ("executor", "task-loop")
SESSIONS = sized(80, 400)
RATE = sized(4.0, 10.0)
KILLS = 5


def relay_state(store_url: str, prefix: str) -> tuple[int, int]:
    """(saved relay position, highest stored position), read with nobody running."""
    with EventStore(store_url) as store:
        saved = store.checkpoints.get(relay_checkpoint(Topology(prefix=prefix)))
        return (saved[0] if saved else 0), store.max_position()


@pytest.mark.timeout(sized(150, 420))
async def test_coordinator_killed_five_times_mid_relay_resumes_and_duplicates_are_absorbed(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    async with process_system(amqp_url, prefix, tmp_path, MODULES) as system:
        coordinator = system.coordinator
        assert coordinator is not None
        assert system.transport is not None
        # The tap: every event the relay publishes, as it is published.
        tapped: list[int] = []
        strike = {"armed": False, "by": ""}

        def kill_now(by: str) -> None:
            if strike["armed"] and coordinator.proc is not None:
                strike["armed"] = False
                strike["by"] = by
                os.kill(coordinator.proc.pid, signal.SIGKILL)

        async def on_event(delivery: Delivery) -> None:
            tapped.append(int(delivery.headers.get(HEADERS.POSITION, 0)))
            if strike["by"] == "" and strike.get("want") == "publish":
                kill_now("publish")
            await delivery.ack()

        tap = f"{prefix}.tap"
        await system.transport.declare_queue(
            QueueSpec(
                tap,
                durable=False,
                exclusive=True,
                auto_delete=True,
                bindings=[(system.topology.events_exchange, "#")],
            )
        )
        handle = await system.transport.consume(tap, on_event, prefetch=1000)

        load = SessionLoad(
            system.client,
            sessions=SESSIONS,
            rate=RATE,
            deadline=sized(130, 380),
            until=asyncio.Event(),  # more sessions until the last kill is over
        )

        def on_acknowledged(_: Command) -> None:
            if strike["by"] == "" and strike.get("want") == "commit":
                kill_now("commit")

        load.on_acknowledged = on_acknowledged
        running = asyncio.create_task(load.run())
        kills: list[dict[str, object]] = []
        for index in range(KILLS):
            await wait_until(
                lambda i=index: load.created >= (i + 1) * SESSIONS // (KILLS + 1),
                timeout=60,
                what=f"load before kill {index + 1}",
            )
            assert not running.done(), "the kill came after the load, not in the middle"
            strike.update(armed=True, by="", want="commit" if index % 2 == 0 else "publish")
            await wait_until(lambda: strike["by"] != "", timeout=20, what="the kill to strike")
            killed_at = time.monotonic()
            assert coordinator.proc is not None
            await coordinator.proc.wait()
            await asyncio.sleep(0.3)  # what the relay published before it died reaches the tap
            saved, stored = await asyncio.to_thread(relay_state, system.store, prefix)
            seen = max(tapped, default=0)
            kills.append(
                {
                    "by": strike["by"],
                    "killed_at": killed_at,
                    # Published and seen, but the relay's saved position is behind them:
                    "published_unsaved": max(0, seen - saved),
                    # Stored, not yet published (by what the tap saw):
                    "committed_unpublished": max(0, stored - max(seen, saved)),
                }
            )
            await coordinator.kill()  # reap the pipes
            restart = time.monotonic()
            await system.start_coordinator()
            kills[-1]["restart"] = restart
            kills[-1]["ready"] = time.monotonic() - restart
        result = await end_load_after(load, running, float(kills[-1]["restart"]))  # type: ignore[arg-type]
        assert result.failures == [], result.failures[:10]
        assert len(result.finished) == len(result.sessions) >= SESSIONS

        await system.settle()
        await handle.close()
        await system.stop()
        report, view = await system.check(result.sessions)
        report.assert_ok()
        for module_id in MODULES:
            assert len(system.lives(module_id)) == 1, f"{module_id} restarted"
        # Retried commands were applied once: one creation per session, and exactly
        # the events the lifecycle makes.
        creations = [e for e in view.envelopes if e.type == "session.created"]
        assert len(creations) == len({e.session_id for e in creations}) == len(result.sessions)

    windows = {
        "published_unsaved": sum(1 for k in kills if k["published_unsaved"]),
        "committed_unpublished": sum(1 for k in kills if k["committed_unpublished"]),
    }
    # The kills must have hit at least one of the two windows, or they proved nothing.
    assert windows["published_unsaved"] + windows["committed_unpublished"] >= 1, kills
    assert report.published_duplicates >= 0
    recovery = [result.first_answer_after(float(k["restart"])) for k in kills]  # type: ignore[arg-type]
    record(
        Row(
            scenario="3 coordinator SIGKILL x5",
            load=f"{len(result.sessions)} sessions, 2 module processes; {result.describe()}",
            faults=f"{KILLS} x SIGKILL (after an ack: {sum(k['by'] == 'commit' for k in kills)}, "
            f"after a publish: {sum(k['by'] == 'publish' for k in kills)}); windows hit: "
            f"committed-unpublished {windows['committed_unpublished']}, "
            f"published-unsaved {windows['published_unsaved']}; "
            f"{report.published_duplicates} duplicate publishes absorbed",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"first command after restart {seconds(recovery)} "
            f"(process ready {seconds([float(k['ready']) for k in kills])})",  # type: ignore[arg-type]
        )
    )
