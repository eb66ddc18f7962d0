"""Scenario 2: the network between the modules and the broker cuts out and slows down.

Two journaling modules reach the broker through a TCP proxy this test runs on
127.0.0.1 (the coordinator and the load's client connect directly). Mid-load the
proxy resets every connection, refuses new ones for a while, adds latency, and cuts
again while slow. The modules reconnect by themselves and the checker finds every
event applied exactly once per module, in order, and every stored event published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.faults.harness import end_load_after, inprocess_system, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.load import SessionLoad
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

MODULES = ("executor", "task-loop")
SESSIONS = sized(60, 400)
RATE = sized(4.0, 12.0)


@pytest.mark.timeout(sized(120, 400))
async def test_modules_ride_out_cuts_refusals_and_latency_through_a_proxy(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = request.node.nodeid[-120:]
    async with (
        TcpProxy.for_url(amqp_url) as proxy,
        inprocess_system(amqp_url, prefix, tmp_path, name) as system,
    ):
        await system.start_coordinator()
        through = proxy.url_for(amqp_url)
        for module_id in MODULES:
            await system.add_module(module_id, url=through)
        assert len(proxy.links) == len(MODULES)
        load = SessionLoad(
            await system.client(),
            sessions=SESSIONS,
            rate=RATE,
            deadline=sized(100, 330),
            until=asyncio.Event(),  # more sessions until the last fault is over
        )
        running = asyncio.create_task(load.run())

        # Each fault returns the moment the path works again (the cut itself, or the
        # end of a refusal): recovery is measured from there.
        async def cut() -> float:
            assert proxy.cut() == len(MODULES)
            return time.monotonic()

        async def outage() -> float:
            assert proxy.outage(2.0) == len(MODULES)
            await asyncio.sleep(2.0)
            return time.monotonic()

        async def slow() -> float:
            proxy.latency = 0.15
            await asyncio.sleep(2.5)
            proxy.latency = 0.0
            return time.monotonic()

        async def cut_while_slow() -> float:
            proxy.latency = 0.1
            await asyncio.sleep(1.0)
            assert proxy.cut() == len(MODULES)
            at = time.monotonic()
            await asyncio.sleep(1.5)
            proxy.latency = 0.0
            return at

        faults: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("cut", cut),
            ("cut + refuse 2 s", outage),
            ("+150 ms each way for 2.5 s", slow),
            ("cut at +100 ms", cut_while_slow),
            ("cut + refuse 2 s", outage),
        ]
        ends: list[tuple[str, float]] = []
        for index, (label, fault) in enumerate(faults):
            await wait_until(
                lambda i=index: load.created >= (i + 1) * SESSIONS // (len(faults) + 1),
                timeout=60,
                what=f"load before fault {index + 1}",
            )
            assert not running.done(), "the fault came after the load, not in the middle"
            ends.append((label, await fault()))
            # Every module is back (a new connection through the proxy) before the next.
            await wait_until(
                lambda: len(proxy.links) == len(MODULES), timeout=30, what="modules reconnected"
            )
        result = await end_load_after(load, running, ends[-1][1])
        assert result.failures == [], result.failures[:10]
        assert len(result.finished) == len(result.sessions) >= SESSIONS
        await system.settle()
        assert proxy.stats.refused > 0, "no reconnect attempt met a refusal"

        resumed = [_resumed(system.modules.values(), end) for _, end in ends]
        reconnected = [proxy.stats.first_accept_after(end) for label, end in ends if "cut" in label]
        report = await system.check(result.sessions)
        report.assert_ok()

    record(
        Row(
            scenario="2 network cuts/latency (proxy)",
            load=f"{len(result.sessions)} sessions, 2 in-process modules via proxy; "
            f"{result.describe()}",
            faults="; ".join(label for label, _ in faults)
            + f" ({proxy.stats.cut} connections cut, {proxy.stats.refused} refused)",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"reconnect {seconds(reconnected)}; consumer {seconds(resumed)}",
        )
    )


def _resumed(modules: object, moment: float) -> float | None:
    times = [t for module in modules for _, _, t in module.applied if t > moment]  # type: ignore[attr-defined]
    return min(times) - moment if times else None
