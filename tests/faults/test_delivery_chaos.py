"""Scenario 5: duplicate and out-of-order deliveries, injected into a module's queue.

A probe module (it takes part in no session: it only applies events) has its queue
unbound from the events exchange; a "chaos shovel" in this test consumes every event
the relay publishes (from a tap queue with the module's bindings) and publishes it into
the probe's queue itself — duplicating 10% of the messages and holding another 10%
back for a while, so that later versions of a session overtake them. Meanwhile a
normal load runs with a real module. The probe must apply every version of every
session exactly once, in version order (gaps filled from the coordinator, the late
and repeated copies skipped).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aio_pika
import pytest

from contracts import WorkflowSession
from contracts.topology import MODULE_ROUTING_KEYS, QueueSpec
from tests.faults.harness import inprocess_system, wait_until
from tests.faults.report import Row, record
from tests.faults.sizes import sized
from tests.support.journal_module import JournalModule
from tests.support.load import SessionLoad
from transport.port import Delivery

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

SESSIONS = sized(60, 400)
RATE = sized(8.0, 16.0)
DUPLICATE = 0.10
DELAY = 0.10


class Probe(JournalModule):
    """Applies events and joins nothing."""

    required = False

    def should_join(self, session: WorkflowSession) -> bool:
        return False


@pytest.mark.timeout(sized(90, 360))
async def test_injected_duplicates_and_reordering_are_applied_once_in_version_order(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(20261126)
    async with inprocess_system(amqp_url, prefix, tmp_path, request.node.nodeid[-120:]) as system:
        await system.start_coordinator()
        await system.add_module("executor")
        probe = await system.add_module("probe", cls=Probe, register=False)
        topology = system.topology
        probe_queue = topology.module_queue("probe")
        # Only the shovel feeds the probe from now on.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(probe_queue, passive=True)
            for key in MODULE_ROUTING_KEYS:
                await queue.unbind(topology.events_exchange, key)

        shovel = await system.connect("shovel")
        tap = f"{prefix}.chaos-tap"
        await shovel.declare_queue(
            QueueSpec(
                tap,
                durable=False,
                exclusive=True,
                auto_delete=True,
                bindings=[(topology.events_exchange, key) for key in MODULE_ROUTING_KEYS],
            )
        )
        injected = {"messages": 0, "duplicated": 0, "delayed": 0}
        late: set[asyncio.Task[None]] = set()

        async def put(delivery: Delivery, wait: float = 0.0) -> None:
            if wait:
                await asyncio.sleep(wait)
            await shovel.publish("", probe_queue, delivery.to_outgoing())

        async def on_event(delivery: Delivery) -> None:
            injected["messages"] += 1
            roll = rng.random()
            if roll < DELAY:
                injected["delayed"] += 1
                task = asyncio.create_task(put(delivery, rng.uniform(0.05, 0.4)))
                late.add(task)
                task.add_done_callback(late.discard)
            else:
                await put(delivery)
                if roll < DELAY + DUPLICATE:
                    injected["duplicated"] += 1
                    if rng.random() < 0.5:
                        await put(delivery)  # at once
                    else:
                        task = asyncio.create_task(put(delivery, rng.uniform(0.05, 0.4)))
                        late.add(task)
                        task.add_done_callback(late.discard)
            await delivery.ack()

        handle = await shovel.consume(tap, on_event, prefetch=256)
        load = SessionLoad(await system.client(), sessions=SESSIONS, rate=RATE, deadline=75)
        result = await load.run()
        assert result.failures == [], result.failures[:10]

        await system.settle(modules=["executor"])
        await wait_until(lambda: not late, timeout=10, what="the held-back copies to be sent")
        await system.settle()
        await handle.close()
        stats = probe.consumer.stats
        report = await system.check(result.sessions)
        report.assert_ok()

    assert injected["duplicated"] > 0
    assert injected["delayed"] > 0
    # Every extra copy was recognised as one; held-back versions were fetched from the
    # coordinator when a later one overtook them.
    assert stats.duplicates >= injected["duplicated"]
    assert stats.gaps_filled > 0
    assert stats.dead_lettered == stats.requeued == 0
    record(
        Row(
            scenario="5 duplicates + reordering",
            load=f"{SESSIONS} sessions, executor + probe in-process; {result.describe()}",
            faults=f"{injected['messages']} events shovelled into the probe's queue: "
            f"{injected['duplicated']} duplicated, {injected['delayed']} held back "
            f"0.05-0.4 s; probe skipped {stats.duplicates}, gap-filled {stats.gaps_filled}",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery="n/a (no outage)",
        )
    )
