"""Scenarios 9-12: the database goes away in the middle of a load, with one coordinator
and with two replicas (two command partitions, one leader) on a PostgreSQL store.

On a private PostgreSQL server: restarted three times (``pg_ctl restart -m fast``);
every backend terminated three times (``pg_terminate_backend``, what a failover proxy
or an ``idle_session_timeout`` does); stopped for 10 s then started; the network
between the coordinators and the database cut and refused through a TCP proxy, twice.
Nobody is told: the coordinators' connections come back by themselves, the leader
retakes its lock, the relay resumes from its checkpoint, and the checker finds every
stored event published and applied exactly once per module, in order, with no hook
called for a session it should not have been.

Each row of the results table gives the commands acknowledged and refused with a
retryable error (the load sends those again with the same command id), lost and
applied twice, spurious hook calls, and the time from the database's return (or the
end of a cut) to the first answered command and to the relay's checkpoint moving again.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.faults.harness import end_load_after, wait_until
from tests.faults.postgres_system import PgSystem, PublishWatch, pg_system
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.load import LoadResult, SessionLoad
from tests.support.private_postgres import PrivatePostgres
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.slow]

MODULES = sized(("executor",), ("executor", "task-loop"))
SESSIONS = sized(24, 240)
RATE = sized(8.0, 15.0)
DOWN_SECONDS = 10.0
CUT_SECONDS = sized(3.0, 5.0)

# A fault: given the server, the proxy in front of it and the load, strike at the
# right moments and return each outage as (began, database back) in monotonic time.
Outages = list[tuple[float, float]]
Fault = Callable[[PrivatePostgres, TcpProxy, SessionLoad], Awaitable[Outages]]


async def _when(load: SessionLoad, share: float, running: asyncio.Task[LoadResult]) -> None:
    await wait_until(
        lambda: load.created >= int(SESSIONS * share), timeout=60, what="the load to progress"
    )
    assert not running.done(), "the fault came after the load, not in the middle"


def _faults(running: asyncio.Task[LoadResult]) -> dict[str, tuple[str, Fault]]:
    async def restarts(pg: PrivatePostgres, _: TcpProxy, load: SessionLoad) -> Outages:
        outages: Outages = []
        for index in range(3):
            await _when(load, (index + 1) / 4, running)
            began = time.monotonic()
            back = await asyncio.to_thread(pg.restart)
            outages.append((began, back))
        return outages

    async def terminations(pg: PrivatePostgres, _: TcpProxy, load: SessionLoad) -> Outages:
        outages: Outages = []
        for index in range(3):
            await _when(load, (index + 1) / 4, running)
            began = time.monotonic()
            killed = await asyncio.to_thread(pg.terminate_backends)
            assert killed > 0, "no backend to terminate: the coordinators hold no connection"
            outages.append((began, time.monotonic()))
        return outages

    async def stopped(pg: PrivatePostgres, _: TcpProxy, load: SessionLoad) -> Outages:
        await _when(load, 1 / 3, running)
        began = time.monotonic()
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(DOWN_SECONDS)  # the outage itself, not a wait for a result
        back = await asyncio.to_thread(pg.start)
        return [(began, back)]

    async def cuts(_: PrivatePostgres, proxy: TcpProxy, load: SessionLoad) -> Outages:
        outages: Outages = []
        for index in range(2):
            await _when(load, (index + 1) / 3, running)
            began = time.monotonic()
            assert proxy.outage(CUT_SECONDS) > 0, "no connection through the proxy to cut"
            await asyncio.sleep(CUT_SECONDS)  # the outage itself
            outages.append((began, time.monotonic()))
        return outages

    return {
        "restart": ("PostgreSQL restart x3", restarts),
        "terminate": ("every backend terminated x3", terminations),
        "stop": (f"PostgreSQL stopped {DOWN_SECONDS:.0f} s", stopped),
        "cut": (f"DB connection cut + refused {CUT_SECONDS:.0f} s x2", cuts),
    }


@pytest.mark.timeout(sized(150, 600))
@pytest.mark.parametrize("replicas", [1, 2], ids=["one", "replicas"])
@pytest.mark.parametrize("fault", ["restart", "terminate", "stop", "cut"])
async def test_the_database_going_away_mid_load_loses_and_duplicates_nothing(
    fault: str,
    replicas: int,
    private_pg_up: PrivatePostgres,
    pgf_store: str,
    amqp_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    pg = private_pg_up
    async with TcpProxy("127.0.0.1", pg.port) as proxy:
        parts = urllib.parse.urlsplit(pgf_store)
        proxied = urllib.parse.urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
        async with (
            pg_system(
                amqp_url,
                prefix,
                tmp_path,
                MODULES,
                store_url=pgf_store,
                coordinator_store=proxied if fault == "cut" else pgf_store,
                replicas=replicas,
            ) as system,
            PublishWatch(pgf_store, prefix) as watch,
        ):
            load = SessionLoad(
                system.client,
                sessions=SESSIONS,
                rate=RATE,
                deadline=sized(100, 400),
                until=asyncio.Event(),
            )
            running = asyncio.create_task(load.run())
            name, strike = _faults(running)[fault]
            outages = await strike(pg, proxy, load)
            result = await end_load_after(load, running, outages[-1][1])
            if result.failures:
                failures = "\n".join(result.failures[:10])
                raise AssertionError(f"{failures}\n{system.output()}")
            assert len(result.finished) == len(result.sessions) >= SESSIONS

            await system.settle()
            await system.wait_followed()
            await system.stop()
            report, _ = await system.check(result.sessions)
            try:
                report.assert_ok()
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{system.output()}") from None
            resumed = [watch.resumed_after(back) for _, back in outages]
            answered = [result.first_answer_after(back) for _, back in outages]
            assert all(r is not None for r in resumed), (resumed, watch.samples[-20:])
            assert all(a is not None for a in answered), answered
            if fault != "stop":
                _assert_no_stall(system)

    topology = "1 coordinator" if replicas == 1 else f"{replicas} replicas, 2 partitions"
    record(
        Row(
            scenario=f"{name} ({topology})",
            load=f"{len(result.sessions)} sessions, {len(MODULES)} module(s): "
            f"{result.commands} commands acknowledged, "
            f"{result.refused_retryable} refused retryably, {result.retries} resent",
            faults=f"{len(outages)} x {fault} (database away "
            f"{seconds([back - began for began, back in outages])}); "
            f"{report.published_duplicates} published twice (absorbed)",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"publishing {seconds(resumed)}; command {seconds(answered)}",
        )
    )


def _assert_no_stall(system: PgSystem) -> None:
    """No coordinator reported the same failure over and over (the symptom of a
    connection that never came back)."""
    for child in system.coordinators:
        failed = child.output.count("leadership connection failed")
        assert failed <= 6, f"{child.name} failed {failed} times:\n{child.output}"
