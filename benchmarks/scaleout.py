"""Commands/s with 1, 2 and 3 coordinator processes on one PostgreSQL store.

Each coordinator is a real `sessionctl coordinator` process; commands are spread over
the partitions by session id; the load generator is a process of its own with a fixed
number of commands in flight. On a 2-core machine the broker, PostgreSQL, the client and
every coordinator share the cores, so this measures contention as much as scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import psycopg

from contracts import RecordActivity, Topology
from module_sdk import CoordinatorClient
from transport.amqp import AmqpTransport

SESSIONCTL = str(Path(sys.executable).with_name("sessionctl"))
AMQP = os.environ.get("SESSIONBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG = os.environ.get("SESSIONBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def _load(prefix: str, partitions: int, inflight: int, seconds: float) -> dict[str, float]:
    topology = Topology(prefix, partitions)
    async with AmqpTransport(AMQP, connection_name=f"{prefix} load") as transport:
        client = CoordinatorClient(transport, topology, timeout=10)
        sessions = [(await client.create_workflow_session([])).session_id for _ in range(inflight)]
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def lane(sid: uuid.UUID) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await client.call(RecordActivity(session_id=sid))
                latencies.append(time.perf_counter() - started)

        begun = time.perf_counter()
        await asyncio.gather(*(lane(sid) for sid in sessions))
        elapsed = time.perf_counter() - begun
    latencies.sort()
    return {
        "commands_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "commands": len(latencies),
    }


async def _drain(process: asyncio.subprocess.Process, index: int, logs: list[str]) -> None:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        logs.append(f"[coordinator {index}] {line.decode(errors='replace').rstrip()}")
        del logs[:-200]


async def _run(replicas: int, partitions: int, inflight: int, seconds: float) -> dict[str, float]:
    prefix = f"bscale{uuid.uuid4().hex[:6]}"
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    store = f"{PG}?schema={schema}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
    processes = []
    drains: list[asyncio.Task[None]] = []
    logs: list[str] = []
    try:
        for index in range(replicas):
            process = await asyncio.create_subprocess_exec(
                SESSIONCTL,
                "coordinator",
                "--amqp-url",
                AMQP,
                "--store",
                store,
                "--prefix",
                prefix,
                "--partitions",
                str(partitions),
                "--replica",
                f"{index}/{replicas}",
                "--identity",
                "guest=*",
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            assert process.stderr is not None
            while b"ready" not in await asyncio.wait_for(process.stderr.readline(), 60):
                pass
            processes.append(process)
            # Keep reading what it logs: a full pipe would stall the process.
            drains.append(asyncio.create_task(_drain(process, index, logs)))
        await asyncio.sleep(2.5)  # staggered standby subscriptions settle
        try:
            return await _load(prefix, partitions, inflight, seconds)
        except BaseException:
            for line in logs[-40:]:
                print(line, file=sys.stderr)
            raise
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.wait_for(process.wait(), 60)
        await asyncio.gather(*drains, return_exceptions=True)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())
        async with AmqpTransport(AMQP) as transport:
            topology = Topology(prefix, partitions)
            for queue in (
                *topology.command_queues(),
                topology.audit_stream,
                topology.dead_letter_queue,
                topology.dead_letter_stream,
                topology.unroutable_queue,
            ):
                await transport.delete_queue(queue)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    results = {}
    for replicas in (int(r) for r in args.replicas.split(",")):
        results[replicas] = asyncio.run(
            _run(replicas, args.partitions, args.inflight, args.seconds)
        )
        print(f"{replicas} coordinator(s): {json.dumps(results[replicas])}", flush=True)


if __name__ == "__main__":
    main()
