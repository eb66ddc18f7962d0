"""Scenario 11: a three-node RabbitMQ cluster loses a node in the middle of a load.

Three nodes on loopback (``tests.support.cluster``), clustered; every party is given
all three addresses, each through a TCP proxy of its own node, in a different order
(the coordinator and the test's client start on the first node, one module on the
second, the other on the third), so the commands queue, the audit stream and the two
module queues are led from different nodes. The quorum queues (commands, module
queues, dead letters, unroutable) and the audit stream have a member on every node.

Faults, each in a load of ``sessionctl coordinator`` and two journaling module
processes: the node leading the commands queue SIGKILLed and started again; the node
leading a module's queue the same; a whole node's client network cut (its proxy resets
every connection and refuses new ones for a while; the links between the nodes stay
up); a rolling restart of all three nodes, one at a time, each once no queue needs it
for a majority. Nobody is told: the parties move to another node by themselves, and
the checker finds every event applied exactly once per module, in order, and every
stored event in the audit stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import ProcessSystem, end_load_after, process_system, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.cluster import Cluster, cluster_tools, rabbitmq_cluster
from tests.support.load import LoadResult, SessionLoad
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.cluster]

MODULES = ("executor", "task-loop")
SESSIONS = sized(30, 300)
RATE = sized(3.0, 10.0)
TIMEOUT = sized(150, 600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three clustered RabbitMQ 4 nodes for this module's scenarios (the machine's own
    RabbitMQ with ``SESSIONBUS_TEST_CLUSTER_RABBITMQ=machine``)."""
    try:
        tools = cluster_tools()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    with rabbitmq_cluster(tools) as nodes:
        yield nodes


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The cluster, checked whole before the test (it outlives each scenario)."""
    problem = cluster.health()
    if problem is not None:
        pytest.fail(f"the RabbitMQ cluster is not whole: {problem}", pytrace=False)
    return cluster


@dataclass
class Run:
    """One scenario's parts: the cluster, a proxy per node, the system and its load."""

    cluster: Cluster
    proxies: list[TcpProxy]
    system: ProcessSystem
    load: SessionLoad


def addresses(cluster: Cluster, proxies: list[TcpProxy], first: int) -> str:
    """Every node's address (through its proxy), starting with node ``first``."""
    count = len(proxies)
    order = [(first + i) % count for i in range(count)]
    return ",".join(proxies[i].url_for(cluster.nodes[i].url) for i in order)


@contextlib.asynccontextmanager
async def scenario(cluster: Cluster, prefix: str, directory: Path) -> AsyncIterator[Run]:
    """Proxies, the system (started, spread over the nodes) and a load (not started)."""
    async with contextlib.AsyncExitStack() as stack:
        proxies = [
            await stack.enter_async_context(TcpProxy("127.0.0.1", node.port))
            for node in cluster.nodes
        ]
        first = addresses(cluster, proxies, 0)
        system = await stack.enter_async_context(
            process_system(first, prefix, directory, MODULES, client_url=first, start=False)
        )
        for index, module_id in enumerate(MODULES, start=1):
            system.module(module_id, url=addresses(cluster, proxies, index))
        await system.start()
        load = SessionLoad(
            system.client,
            sessions=SESSIONS,
            rate=RATE,
            deadline=sized(120, 500),
            until=asyncio.Event(),  # more sessions until the last fault is over
        )
        yield Run(cluster, proxies, system, load)


def assert_replicated(cluster: Cluster, run: Run) -> None:
    """Every quorum queue and the audit stream of the system has a member on each node."""
    topology = run.system.topology
    queues = cluster.queues(f"{topology.prefix}.")
    every = sorted(node.name for node in cluster.nodes)
    expected = {
        topology.commands_queue(): "quorum",
        topology.dead_letter_queue: "quorum",
        topology.unroutable_queue: "quorum",
        topology.audit_stream: "stream",
        topology.dead_letter_stream: "stream",
        **{topology.module_queue(m): "quorum" for m in MODULES},
    }
    for name, kind in expected.items():
        info = queues.get(name)
        assert info is not None, f"{name} not declared: {sorted(queues)}"
        assert info.type == kind, info
        assert info.members == every, info


async def run_scenario(
    cluster: Cluster,
    prefix: str,
    directory: Path,
    label: str,
    fault: Callable[[Run], Awaitable[tuple[str, list[tuple[float, float]]]]],
) -> None:
    """Start the system and a load, strike with ``fault`` once a third of the planned
    sessions exist (it returns what it did and each outage as (began, over)), end the
    load once a request after the last outage is answered, settle, check, record."""
    async with scenario(cluster, prefix, directory) as run:
        assert_replicated(cluster, run)
        load, system = run.load, run.system
        running = asyncio.create_task(load.run())
        await wait_until(
            lambda: load.created >= SESSIONS // 3, timeout=60, what="load before the fault"
        )
        assert not running.done(), "the fault came after the load, not in the middle"
        try:
            what, outages = await fault(run)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{await diagnosis(run)}") from exc
        result: LoadResult = await end_load_after(load, running, outages[-1][1])
        assert result.failures == [], result.failures[:10]
        assert len(result.finished) == len(result.sessions) >= SESSIONS

        await system.settle()
        await system.stop()
        report, _ = await system.check(result.sessions)
        report.assert_ok()
        for module_id in MODULES:
            lives = system.lives(module_id)
            assert len(lives) == 1, f"{module_id} restarted: it should have moved node"
            assert not lives[0].crashed
        assert cluster.health() is None, cluster.health()

    # Time to resume: the longest stretch without an answered request (or without an
    # event applied by any module) from the fault until the first one after it is
    # over. (The first answer after the fault alone can be a reply already on its way.)
    applied = sorted(t for m in MODULES for life in system.lives(m) for t in life.times)
    commands = [longest_pause(result.answered_at, began, over) for began, over in outages]
    consumers = [longest_pause(applied, began, over) for began, over in outages]
    assert all(c is not None for c in commands), commands
    assert all(c is not None for c in consumers), consumers
    down: list[float | None] = [over - began for began, over in outages]
    record(
        Row(
            scenario=f"11 cluster: {label}",
            load=f"{len(result.sessions)} sessions, 2 module processes; {result.describe()}",
            faults=f"{what} (down {seconds(down)}); "
            f"{report.published_duplicates} events published twice (absorbed); "
            f"audit stream complete: {not report.unpublished}",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            recovery=f"commands paused {seconds(commands)}; consumers paused "
            f"{seconds(consumers)}; {cluster.boot_retries} failed boots started again",
        )
    )


def longest_pause(times: list[float], began: float, over: float) -> float | None:
    """The longest gap in ``times`` (sorted) from ``began`` up to the first time after
    ``over``; None if nothing happened after ``over``."""
    after = [t for t in times if t > over]
    if not after:
        return None
    window = [began, *(t for t in times if began < t <= after[0])]
    return max(b - a for a, b in itertools.pairwise(window))


async def diagnosis(run: Run) -> str:
    """What each party printed and where the queues are, for a failure message."""
    system = run.system
    result = run.load.result
    load = (
        f"load: {run.load.created} created, {result.retries} retries, "
        f"{len(result.failures)} failures {result.failures[:5]}"
    )
    parts = [load]
    parts += [f"{name}:\n{child.output[-3000:]}" for name, child in system.modules.items()]
    if system.coordinator is not None:
        parts.append(f"coordinator:\n{system.coordinator.output[-5000:]}")
    with contextlib.suppress(Exception):
        queues = await asyncio.to_thread(run.cluster.queues, f"{system.topology.prefix}.")
        parts.append("queues:\n" + "\n".join(str(q) for q in queues.values()))
    with contextlib.suppress(Exception):
        consumers = await asyncio.to_thread(
            run.cluster.any_running().ctl,
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "-q",
        )
        parts.append(f"depths:\n{consumers}")
        consumers = await asyncio.to_thread(
            run.cluster.any_running().ctl,
            "list_consumers",
            "queue_name",
            "channel_pid",
            "active",
            "activity_status",
            "-q",
        )
        parts.append(f"consumers:\n{consumers}")
    return "\n".join(parts)


async def kill_leader_of(run: Run, queue: str) -> tuple[str, list[tuple[float, float]]]:
    """SIGKILL the node leading ``queue``; once a command is answered without it (the
    load goes on, on the other two), start it again."""
    cluster = run.cluster
    leader = await asyncio.to_thread(cluster.leader, queue)
    killed = time.monotonic()
    await asyncio.to_thread(cluster.kill, leader)
    await wait_until(
        lambda: run.load.answered_after(killed), timeout=60, what="a command answered without it"
    )

    async def moved() -> bool:
        # The leader the broker lists catches up with the election a little later.
        return (await asyncio.to_thread(cluster.leader, queue)).name != leader.name

    await wait_until(moved, timeout=30, what=f"{queue} led from another node", every=0.5)
    back = await asyncio.to_thread(cluster.restart, leader)
    return f"SIGKILL {leader.short} (leading {queue}), then started again", [(killed, back)]


@pytest.mark.timeout(TIMEOUT)
async def test_node_leading_the_commands_queue_killed_mid_load(
    healthy: Cluster, private_prefix: str, tmp_path: Path
) -> None:
    async def fault(run: Run) -> tuple[str, list[tuple[float, float]]]:
        return await kill_leader_of(run, run.system.topology.commands_queue())

    await run_scenario(healthy, private_prefix, tmp_path, "commands leader killed", fault)


@pytest.mark.timeout(TIMEOUT)
async def test_node_leading_a_module_queue_killed_mid_load(
    healthy: Cluster, private_prefix: str, tmp_path: Path
) -> None:
    async def fault(run: Run) -> tuple[str, list[tuple[float, float]]]:
        topology = run.system.topology
        commands = await asyncio.to_thread(run.cluster.leader, topology.commands_queue())
        # A module queue led from another node than the commands queue, if there is one.
        for module_id in MODULES:
            queue = topology.module_queue(module_id)
            if (await asyncio.to_thread(run.cluster.leader, queue)).name != commands.name:
                break
        return await kill_leader_of(run, queue)

    await run_scenario(healthy, private_prefix, tmp_path, "module queue leader killed", fault)


@pytest.mark.timeout(TIMEOUT)
async def test_whole_node_network_cut_mid_load(
    healthy: Cluster, private_prefix: str, tmp_path: Path
) -> None:
    """The coordinator's and the client's node becomes unreachable for the clients:
    every connection to it reset, new ones refused for a while."""
    outage = sized(5.0, 15.0)

    async def fault(run: Run) -> tuple[str, list[tuple[float, float]]]:
        proxy = run.proxies[0]
        began = time.monotonic()
        cut = proxy.outage(outage)
        assert cut >= 2, f"{cut} connections through the first node's proxy"
        await wait_until(
            lambda: run.load.answered_after(began), timeout=60, what="a command answered"
        )
        await asyncio.sleep(max(0.0, began + outage - time.monotonic()))
        short = run.cluster.nodes[0].short
        return f"{short}'s network cut ({cut} connections), refused {outage:.0f} s", [
            (began, time.monotonic())
        ]

    await run_scenario(healthy, private_prefix, tmp_path, "node network cut", fault)


@pytest.mark.timeout(sized(300, 900))
async def test_rolling_restart_of_all_three_nodes_mid_load(
    healthy: Cluster, private_prefix: str, tmp_path: Path
) -> None:
    async def fault(run: Run) -> tuple[str, list[tuple[float, float]]]:
        cluster = run.cluster
        outages: list[tuple[float, float]] = []
        for node in cluster.nodes:
            # Only once no quorum queue or stream needs this node for its majority.
            await asyncio.to_thread(cluster.wait_quorum_safe, node)
            began = time.monotonic()
            await asyncio.to_thread(cluster.stop_node, node)
            outages.append((began, await asyncio.to_thread(cluster.restart, node)))
        return "each node stopped and started in turn", outages

    await run_scenario(healthy, private_prefix, tmp_path, "rolling restart", fault)
