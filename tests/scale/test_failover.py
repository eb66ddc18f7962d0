"""Scale-out: several coordinator processes on partitioned command queues sharing one
PostgreSQL store; one killed with SIGKILL under load.

Proves: a new owner takes each orphaned partition within 5 s; the store's leadership
(relay, timeouts) moves too; no acknowledged command is lost or applied twice; every
stored event is published; every hash chain holds. Clients see at most retried
timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contracts import (
    ActivityRecorded,
    Command,
    CreateWorkflowSession,
    DestroyWorkflowSession,
    GetLinkedSessions,
    RecordActivity,
    SessionCreated,
    SessionStatus,
    Topology,
    UpdateSessionStatus,
    verify_chain_raw,
)
from coordinator.store.eventstore import EventStore
from module_sdk import CommandFailed, CoordinatorClient, CoordinatorUnavailable
from transport.amqp import AmqpTransport
from transport.audit import read_audit_stream

pytestmark = [pytest.mark.broker, pytest.mark.postgres, pytest.mark.slow]

SESSIONCTL = str(Path(sys.executable).with_name("sessionctl"))
PARTITIONS = 4
log = logging.getLogger("tests.scale")


@dataclass
class Ledger:
    """What the clients were told: every acknowledged command and its session."""

    acked: dict[uuid.UUID, tuple[str, uuid.UUID]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    gave_up: int = 0


async def _start(
    index: int, count: int, url: str, store: str, prefix: str
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
    env["SESSIONBUS_CONNECTION_NAME"] = f"{prefix} coordinator {index}"
    process = await asyncio.create_subprocess_exec(
        SESSIONCTL,
        "coordinator",
        "--amqp-url",
        url,
        "--store",
        store,
        "--prefix",
        prefix,
        "--partitions",
        str(PARTITIONS),
        "--replica",
        f"{index}/{count}",
        "--identity",
        "guest=*",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        assert line, f"coordinator {index} exited before it was ready"
        if b"ready" in line:
            return process


def _session_in_partition(topology: Topology, partition: int) -> uuid.UUID:
    while True:
        candidate = uuid.uuid4()
        if topology.partition_of(candidate) == partition:
            return candidate


async def _call(
    client: CoordinatorClient, ledger: Ledger, command: Command, sid: uuid.UUID
) -> bool:
    command_id = uuid.uuid4()
    try:
        await client.call(command, command_id=command_id)
    except CoordinatorUnavailable:
        ledger.gave_up += 1
        return False
    except CommandFailed as exc:
        ledger.refused.append(f"{type(command).__name__}: {exc}")
        return False
    ledger.acked[command_id] = (type(command).__name__, sid)
    return True


async def _worker(
    client: CoordinatorClient, ledger: Ledger, stop: asyncio.Event, rounds: int
) -> None:
    for _ in range(rounds):
        if stop.is_set():
            return
        sid = uuid.uuid4()
        if not await _call(client, ledger, CreateWorkflowSession(session_id=sid, steps=["x"]), sid):
            continue
        for _ in range(2):
            await _call(client, ledger, RecordActivity(session_id=sid), sid)
        await _call(
            client, ledger, UpdateSessionStatus(session_id=sid, status=SessionStatus.COMPLETED), sid
        )
        await _call(client, ledger, DestroyWorkflowSession(session_id=sid), sid)


async def _probe_until_served(
    client: CoordinatorClient, topology: Topology, partition: int, since: float
) -> float:
    """Seconds from ``since`` until a command to ``partition`` is answered."""
    sid = _session_in_partition(topology, partition)
    while True:
        try:
            await client.call(GetLinkedSessions(session_id=sid), timeout=0.5)
            return time.monotonic() - since
        except CoordinatorUnavailable:
            continue


@pytest.mark.parametrize("replicas", [2, 3])
async def test_a_killed_coordinator_s_partitions_and_leadership_move_and_nothing_is_lost(
    replicas: int, amqp_url: str, prefix: str, pg_store_url: str
) -> None:
    topology = Topology(prefix, PARTITIONS)
    processes = [await _start(i, replicas, amqp_url, pg_store_url, prefix) for i in range(replicas)]
    transport = AmqpTransport(amqp_url, connection_name=f"{prefix} clients")
    await transport.connect()
    try:
        await asyncio.sleep(2.5)  # the staggered standby subscriptions are in place
        client = CoordinatorClient(transport, topology, timeout=1.0, attempts=8)
        ledger = Ledger()
        stop = asyncio.Event()
        workers = [asyncio.create_task(_worker(client, ledger, stop, rounds=400)) for _ in range(8)]
        await asyncio.sleep(2.0)
        victim = processes[0]  # replica 0: the first leader, owner of partitions 0 and 2
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        probe = CoordinatorClient(transport, topology, timeout=0.5, attempts=1)
        takeover = await asyncio.gather(
            *(_probe_until_served(probe, topology, p, killed_at) for p in range(PARTITIONS))
        )
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        log.info(
            "%d replicas: partitions taken over after %s s; %d commands acknowledged, "
            "%d client retries exhausted",
            replicas,
            [round(t, 2) for t in takeover],
            len(ledger.acked),
            ledger.gave_up,
        )
        assert max(takeover) < 5.0, takeover
        assert ledger.refused == []
        assert ledger.gave_up == 0
        assert len(ledger.acked) > 100
    finally:
        await transport.close()
        survivors = [p for p in processes if p.returncode is None]
        for process in survivors:
            process.send_signal(signal.SIGTERM)
        for process in survivors:
            await asyncio.wait_for(process.wait(), 60)
    assert all(p.returncode == 0 for p in processes[1:])

    with EventStore(pg_store_url) as store:
        envelopes = [env for page in store.iter_all() for env in page]
        by_command = Counter(env.causation_id for env in envelopes)
        sessions = {sid for _, sid in ledger.acked.values()}
        # Nothing lost: every acknowledged command left its events.
        missing = [cid for cid in ledger.acked if by_command[cid] == 0]
        assert missing == []
        # Nothing applied twice: one creation per session, one event per activity.
        created = Counter(
            env.session_id for env in envelopes if isinstance(env.event, SessionCreated)
        )
        assert all(created[sid] == 1 for sid in sessions)
        for cid, (kind, _) in ledger.acked.items():
            if kind == "RecordActivity":
                assert by_command[cid] == 1
        activity = [e for e in envelopes if isinstance(e.event, ActivityRecorded)]
        assert len(activity) == sum(
            1 for kind, _ in ledger.acked.values() if kind == "RecordActivity"
        )
        for sid in sessions:
            assert verify_chain_raw(store.raw_history(sid)).ok
        stored_ids = {env.event_id for env in envelopes}

    # Leadership moved with the kill: the survivor's relay published everything.
    async with AmqpTransport(amqp_url, connection_name=f"{prefix} auditor") as auditor:
        published = {
            env.event_id
            async for env in read_audit_stream(auditor, topology, idle_seconds=2.0)
            if not isinstance(env, Exception)
        }
    assert stored_ids <= published
