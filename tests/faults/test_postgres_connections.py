"""Every PostgreSQL connection of a coordinator survives the database going away, on a
private PostgreSQL server the test restarts, stops and cuts.

Each test here is one finding, proven first against the code before the fix: the
relay publishing again after ``pg_ctl restart -m fast``; the checkpoints table's
connection coming back after its backend is terminated; the relay checkpoint only
moving forward with two writers; a leader whose connection is black-holed stepping
down before the database lets another coordinator take the lock; a coordinator
stopped while its database is down exiting cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from contracts import CreateWorkflowSession, Topology, new_id
from coordinator.domain.identity import IdentityMap
from coordinator.errors import CommandRejected, CoordinatorError
from coordinator.service.leader import Leadership
from coordinator.service.runtime import CoordinatorRuntime
from coordinator.store.eventstore import EventStore, StoreSettings
from module_sdk import CoordinatorClient
from tests.faults.harness import wait_until
from tests.support.private_postgres import PrivatePostgres
from tests.support.processes import Child, coordinator_argv
from tests.support.tcp_proxy import TcpProxy
from transport.amqp import AmqpTransport

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres]


async def _create(runtime: CoordinatorRuntime, deadline: float) -> None:
    """One session, retried (same command id) while the store is unavailable."""
    command_id = new_id()
    while True:
        try:
            await runtime.coordinator.handle(
                CreateWorkflowSession(session_id=new_id(), steps=["s"]), command_id=command_id
            )
        except (CommandRejected, CoordinatorError) as exc:
            if isinstance(exc, CommandRejected) and not exc.retryable:
                raise
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            return


async def _published_everything(runtime: CoordinatorRuntime) -> bool:
    store = runtime.coordinator.store
    assert store is not None
    try:
        top = await asyncio.to_thread(store.max_position)
    except CoordinatorError:
        return False
    relay = runtime.relay
    return relay is not None and relay.position >= top > 0


def _runtime(amqp_url: str, prefix: str, store: str) -> CoordinatorRuntime:
    return CoordinatorRuntime(
        AmqpTransport(amqp_url, connection_name=f"{prefix} coordinator"),
        store=store,
        topology=Topology(prefix),
        identity=IdentityMap.parse("guest=*"),
    )


@pytest.mark.timeout(90)
async def test_the_relay_publishes_again_after_postgres_restarts(
    private_pg: PrivatePostgres,
    pgf_store: str,
    amqp_url: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionbus")
    async with _runtime(amqp_url, prefix, pgf_store) as runtime:
        deadline = time.monotonic() + 40
        for _ in range(5):
            await _create(runtime, deadline)
        await wait_until(
            lambda: _published_everything(runtime), timeout=15, what="the first sessions published"
        )
        back = await asyncio.to_thread(private_pg.restart)
        for _ in range(5):
            await _create(runtime, deadline)
        # Everything committed after the restart is published by the same process.
        await wait_until(
            lambda: _published_everything(runtime),
            timeout=20,
            what="the relay to publish after the restart",
        )
        resumed = time.monotonic() - back
        assert runtime.is_leader
    failed = [r for r in caplog.records if "leadership connection failed" in r.getMessage()]
    assert len(failed) <= 3, [r.getMessage() for r in failed]
    assert resumed < 15


def test_the_checkpoints_connection_comes_back_after_its_backend_is_terminated(
    private_pg: PrivatePostgres, pgf_store: str
) -> None:
    with EventStore(pgf_store) as store:
        store.checkpoints.put("relay:x", 7)
        assert private_pg.terminate_backends() >= 1
        assert store.checkpoints.get("relay:x") == (7, b"")
        store.checkpoints.put("relay:x", 8)
        private_pg.restart()
        assert store.checkpoints.get("relay:x") == (8, b"")


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_the_relay_checkpoint_only_moves_forward_with_two_writers(
    backend: str, pgf_store: str, tmp_path: Path
) -> None:
    url = pgf_store if backend == "postgres" else f"sqlite:///{tmp_path / 'store.sqlite'}"
    with EventStore(url) as first, EventStore(url) as second:
        assert first.checkpoints.advance("relay:x", 100) == 100
        # A lagging relay (a deposed leader) saves an older position: it is ignored,
        # and told where the checkpoint stands.
        assert second.checkpoints.advance("relay:x", 40) == 100
        assert first.checkpoints.get("relay:x") == (100, b"")
        # Two writers racing: whatever the interleaving, the highest position wins.
        positions = {first: list(range(101, 400, 2)), second: list(range(400, 101, -2))}

        def write(store: EventStore) -> None:
            for position in positions[store]:
                store.checkpoints.advance("relay:x", position)

        threads = [threading.Thread(target=write, args=(s,)) for s in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert second.checkpoints.get("relay:x") == (400, b"")


@pytest.mark.timeout(90)
async def test_a_black_holed_leader_stops_publishing_before_another_takes_the_lock(
    private_pg: PrivatePostgres, pgf_store: str
) -> None:
    """The leader's connection goes through a proxy that stops forwarding (a network
    partition: no reset, no reply). Its lock check times out and it steps down; the
    database ends its idle session only later, and only then can the standby's
    ``pg_try_advisory_lock`` succeed: there is never a moment with two leaders."""
    changes: list[tuple[str, bool, float]] = []

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def on_change(leader: bool) -> None:
            changes.append((name, leader, time.monotonic()))

        return on_change

    settings = StoreSettings.from_url(pgf_store)
    async with TcpProxy("127.0.0.1", private_pg.port) as proxy:
        parts = urllib.parse.urlsplit(pgf_store)
        proxied = StoreSettings.from_url(
            urllib.parse.urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
        )
        first = Leadership(proxied, "leader:pgf", recorder("first"), interval=0.2)
        second = Leadership(settings, "leader:pgf", recorder("second"), interval=0.2)
        await first.start()
        await wait_until(lambda: first.is_leader, timeout=10, what="the first leader")
        await second.start()
        try:
            await asyncio.sleep(0.5)
            assert not second.is_leader
            cut_at = time.monotonic()
            proxy.refuse_for(120)  # a partition: no new connection gets through either
            proxy.blackhole()
            await wait_until(lambda: second.is_leader, timeout=60, what="the standby to lead")
            first_lost = next(t for n, lead, t in changes if n == "first" and not lead)
            second_took = next(t for n, lead, t in changes if n == "second" and lead)
            # The holder stopped publishing (its lease ran out) before the lock was free.
            assert first_lost < second_took, changes
            assert not first.holds_lease()
            assert first_lost - cut_at <= first.lease + 0.5
        finally:
            await first.close()
            await second.close()


@pytest.mark.timeout(120)
async def test_a_coordinator_stopped_while_postgres_is_down_exits_cleanly(
    private_pg: PrivatePostgres, pgf_store: str, amqp_url: str, prefix: str
) -> None:
    child = Child("coordinator", coordinator_argv(amqp_url, pgf_store, prefix))
    await child.start(ready="; ready")
    try:
        # Something to checkpoint on close (an empty projection writes none).
        async with AmqpTransport(amqp_url, connection_name=f"{prefix} client") as transport:
            client = CoordinatorClient(transport, Topology(prefix), timeout=5.0)
            await client.create_workflow_session(["s"])
        await asyncio.to_thread(private_pg.stop)
        code = await child.stop(timeout=60)
    finally:
        child.kill_now()
        await asyncio.to_thread(private_pg.start)
    assert code == 0, child.output
    assert "Traceback" not in child.output, child.output
    assert "projection checkpoint not written on close" in child.output, child.output
