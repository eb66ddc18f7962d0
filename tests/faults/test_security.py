"""Scenario 8: security — identity, broker permissions, tamper evidence, TLS.

- Two modules, each connected as a broker user of its own with exactly
  ``sessionctl.definitions.module_permissions`` (and nothing more: the SDK must work
  with that), under load. One module tries to act on the other's module sessions
  (link, unlink, status, activity, orphan report): FORBIDDEN, nothing stored. It forges
  the AMQP ``user_id``: the broker refuses the message. It publishes to the events
  exchange, declares a queue bound to it, consumes the other's queue: the broker's
  permissions refuse each. The load completes and every module applied every event.
- A one-byte change in a stored event, decodable or not, is found by
  ``sessionctl sessions history ID --verify --store URL``: exit 1, naming the version.
- On the private node with a self-signed TLS certificate, the coordinator and a module
  (both as processes, by ``amqps://`` URL) and the test's client (with an
  ``ssl.SSLContext``) run sessions end to end; every connection is TLS, and a client
  that does not trust the CA cannot connect.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from contracts import (
    GENESIS_HASH,
    Codec,
    Command,
    CommandRequest,
    ErrorCode,
    EventEnvelope,
    LinkModuleSession,
    RecordActivity,
    ReportOrphan,
    SessionStatus,
    StatusChanged,
    Topology,
    UnlinkModuleSession,
    UpdateSessionStatus,
    new_id,
    seal,
)
from contracts.topology import QueueSpec
from coordinator.service.coordinator import SessionCoordinator
from module_sdk import CommandFailed, CoordinatorClient
from sessionctl.definitions import module_permissions
from tests.faults.harness import inprocess_system, process_system, wait_until
from tests.faults.report import Row, record
from tests.faults.sizes import sized
from tests.support.broker_admin import user_url
from tests.support.checker import StoreView
from tests.support.least_privilege import restricted_users
from tests.support.load import SessionLoad
from tests.support.private_broker import PrivateBroker
from tests.support.processes import run_sessionctl
from transport.amqp import AmqpTransport
from transport.port import AccessRefused, OutgoingMessage, TransportError

S = SessionStatus
JSON = Codec("json")
PASSWORD = "sessionbus-fault-secret"


@pytest.mark.faults
@pytest.mark.broker
@pytest.mark.timeout(sized(90, 300))
async def test_a_least_privilege_module_is_refused_everything_that_is_not_its_own(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    topology = Topology(prefix)
    users = {
        f"{prefix}-executor": module_permissions(topology, "executor"),
        f"{prefix}-taskloop": module_permissions(topology, "task-loop"),
    }
    executor_user, taskloop_user = users
    identity = f"{executor_user}=executor;{taskloop_user}=task-loop;guest=*"
    with restricted_users(users, PASSWORD):
        async with inprocess_system(
            amqp_url, prefix, tmp_path, request.node.nodeid[-120:], identity=identity
        ) as system:
            await system.start_coordinator()
            executor = await system.add_module(
                "executor", url=user_url(amqp_url, executor_user, PASSWORD)
            )
            taskloop = await system.add_module(
                "task-loop", url=user_url(amqp_url, taskloop_user, PASSWORD)
            )
            ops = await system.client("ops")
            live = [(await ops.create_workflow_session(["s"])).session_id for _ in range(3)]
            for sid in live:
                await wait_until(
                    lambda sid=sid: _status(system, sid) is S.ACTIVE, timeout=20, what="ACTIVE"
                )
            load = SessionLoad(ops, sessions=sized(30, 200), rate=10.0, deadline=60)
            running = asyncio.create_task(load.run())

            # Commands for the other module's sessions.
            refused: dict[uuid.UUID, str] = {}
            for sid in live:
                theirs = taskloop.sessions[sid].modules["task-loop"].session_id
                mine = executor.sessions[sid].modules["executor"].session_id
                other = "task-loop"
                attempts: list[tuple[CoordinatorClient, Command]] = [
                    (
                        executor.client,
                        LinkModuleSession(
                            session_id=sid, module_id=other, module_session_id=new_id()
                        ),
                    ),
                    (executor.client, UnlinkModuleSession(session_id=sid, module_id=other)),
                    (
                        executor.client,
                        UpdateSessionStatus(session_id=sid, status=S.FAILED, module_id=other),
                    ),
                    (executor.client, RecordActivity(session_id=sid, module_id=other)),
                    (
                        executor.client,
                        ReportOrphan(session_id=sid, module_id=other, module_session_id=theirs),
                    ),
                    (taskloop.client, UnlinkModuleSession(session_id=sid, module_id="executor")),
                    (
                        taskloop.client,
                        ReportOrphan(session_id=sid, module_id="executor", module_session_id=mine),
                    ),
                ]
                for client, command in attempts:
                    command_id = new_id()
                    with pytest.raises(CommandFailed) as caught:
                        await client.call(command, command_id=command_id)
                    assert caught.value.code is ErrorCode.FORBIDDEN, command
                    refused[command_id] = type(command).__name__

            # A forged user_id: the broker refuses it, the coordinator never sees it.
            handled = system.runtime.server.handled + system.runtime.server.rejected  # type: ignore[union-attr]
            forged = CommandRequest(
                command_id=new_id(),
                issued_at=datetime.now(UTC),
                command=UnlinkModuleSession(session_id=live[0], module_id="task-loop"),
            )
            refused[forged.command_id] = "forged user_id"
            with pytest.raises(AccessRefused, match="user_id"):
                await executor.transport.publish(
                    "",
                    topology.commands_queue(),
                    OutgoingMessage(
                        body=JSON.encode(forged),
                        content_type=JSON.content_type,
                        correlation_id=str(new_id()),
                        user_id=taskloop_user,
                    ),
                )

            # Broker permissions: no publishing events, no snooping on them.
            fake = seal(
                EventEnvelope(
                    event_id=new_id(),
                    session_id=live[0],
                    version=99,
                    occurred_at=datetime.now(UTC),
                    actor="coordinator",
                    prev_hash=GENESIS_HASH,
                    hash=GENESIS_HASH,
                    event=StatusChanged(old_status=S.ACTIVE, new_status=S.CLEANUP),
                )
            )
            broker_refusals: list[str] = []
            probes: dict[str, Callable[[], object]] = {
                "publish to the events exchange": lambda: executor.transport.publish(
                    topology.events_exchange,
                    "session.status-changed",
                    OutgoingMessage(body=JSON.encode(fake), content_type=JSON.content_type),
                ),
                "declare a queue bound to the events": lambda: executor.transport.declare_queue(
                    QueueSpec(
                        f"{prefix}.module.snoop",
                        bindings=[(topology.events_exchange, "#")],
                    )
                ),
                "consume the other module's queue": lambda: executor.transport.consume(
                    topology.module_queue("task-loop"), _drop
                ),
                "consume the commands queue": lambda: executor.transport.consume(
                    topology.commands_queue(), _drop
                ),
            }
            for label, probe in probes.items():
                with pytest.raises(AccessRefused):
                    await probe()  # type: ignore[misc]
                broker_refusals.append(label)

            result = await running
            assert result.failures == [], result.failures[:10]
            # The refusals cost the modules nothing: their connections still work.
            await executor.record_activity(live[0])
            await taskloop.record_activity(live[0])
            assert system.runtime.server.handled + system.runtime.server.rejected >= handled  # type: ignore[union-attr]
            for sid in live:
                session = system.runtime.coordinator.projections.sessions[sid]  # type: ignore[union-attr]
                assert set(session.modules) == {"executor", "task-loop"}
                assert session.status is S.ACTIVE
                await ops.destroy_workflow_session(sid)
            for sid in live:
                await wait_until(
                    lambda sid=sid: sid not in system.runtime.coordinator.projections.sessions,  # type: ignore[union-attr]
                    timeout=20,
                    what="destroyed",
                )
            await system.settle()
            report = await system.check([*result.sessions, *live])
            report.assert_ok()
            view = StoreView.read(system.store)

    caused = {env.causation_id for env in view.envelopes}
    stored = sorted(name for cid, name in refused.items() if cid in caused)
    assert stored == [], f"refused commands left events: {stored}"
    record(
        Row(
            scenario="8a identity + permissions",
            load=f"{len(result.sessions)} sessions + 3 held ACTIVE; modules as least-privilege "
            f"broker users; {result.describe()}",
            faults=f"{len(refused) - 1} commands for another module's sessions (all FORBIDDEN, "
            f"none stored); forged user_id (broker refused); {len(broker_refusals)} broker "
            f"permission probes refused ({'; '.join(broker_refusals)})",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery="n/a (no outage)",
        )
    )


async def _drop(delivery: object) -> None:
    raise AssertionError(f"a refused consumer received {delivery}")


def _status(system: object, sid: uuid.UUID) -> SessionStatus | None:
    session = system.runtime.coordinator.projections.sessions.get(sid)  # type: ignore[attr-defined]
    return session.status if session is not None else None


def _flip(path: Path, sid: uuid.UUID, version: int, how: str) -> None:
    """Change exactly one byte of one stored event."""
    with sqlite3.connect(path) as db:
        rowid, state = db.execute(
            "SELECT rowid, state FROM stored_events WHERE originator_id = ? "
            "AND originator_version = ?",
            (sid.hex, version),
        ).fetchone()
        state = bytes(state)
        # Decodable: one character of the actor's name (still valid JSON, another event).
        # Undecodable: the opening brace (the event no longer parses).
        at = state.index(b'"actor":"') + len(b'"actor":"') if how == "decodable" else 0
        changed = (
            state[:at]
            + bytes([state[at] ^ 0x01 if how == "decodable" else ord("[")])
            + state[at + 1 :]
        )
        assert len(changed) == len(state)
        assert sum(a != b for a, b in zip(changed, state, strict=True)) == 1
        db.execute("UPDATE stored_events SET state = ? WHERE rowid = ?", (changed, rowid))


@pytest.mark.faults
async def test_a_one_byte_change_in_a_stored_event_is_found_by_sessionctl_verify(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.sqlite"
    store = f"sqlite:///{path}"
    coordinator = SessionCoordinator(store)
    await coordinator.start()
    try:
        sids = []
        for index in range(4):
            session = await coordinator.create_workflow_session([f"s{index}"])
            await coordinator.update_session_status(session.session_id, S.COMPLETED)
            await coordinator.destroy_workflow_session(session.session_id)
            sids.append(session.session_id)
    finally:
        await coordinator.close()
    untouched, decodable, broken, last = sids
    versions = len(StoreView.read(store).versions[untouched])
    _flip(path, decodable, 2, "decodable")
    _flip(path, broken, 2, "undecodable")
    _flip(path, last, versions, "decodable")  # the newest event: no later one links to it

    ok = await run_sessionctl("sessions", "history", str(untouched), "--verify", "--store", store)
    assert ok.code == 0, ok.err
    assert f"hash chain: ok ({versions} events)" in ok.out
    for sid, version in ((decodable, 2), (broken, 2), (last, versions)):
        found = await run_sessionctl("sessions", "history", str(sid), "--verify", "--store", store)
        assert found.code == 1, (found.out, found.err)
        assert f"hash chain: BROKEN at version {version}" in found.out, (found.out, found.err)
        assert "Traceback" not in found.err, found.err
        as_json = await run_sessionctl(
            "sessions", "history", str(sid), "--verify", "--store", store, "--json"
        )
        assert as_json.code == 1
        verdict = json.loads(as_json.out)["verdict"]
        assert verdict["ok"] is False
        assert verdict["first_bad_version"] == version
    record(
        Row(
            scenario="8b tamper evidence",
            load="4 sessions in a SQLite store",
            faults="one byte changed in 3 stored events (2 decodable incl. the newest, "
            "1 unparseable)",
            events_checked=versions * 4,
            lost=0,
            duplicated_applied=0,
            recovery="detected 3/3: exit 1, version named",
        )
    )


@pytest.mark.faults
@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(sized(120, 300))
async def test_coordinator_and_module_run_sessions_end_to_end_over_tls(
    private_node: PrivateBroker, private_prefix: str, tmp_path: Path
) -> None:
    tls_url = private_node.tls_url()
    # Nobody trusts a self-signed certificate by default.
    untrusting = AmqpTransport(
        f"amqps://guest:guest@localhost:{private_node.tls_port}/", connect_timeout=5
    )
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusting.connect()

    context = ssl.create_default_context(cafile=str(private_node.ca_file))
    async with process_system(
        tls_url, private_prefix, tmp_path, ("executor",), start=False
    ) as system:
        await system.start_coordinator()
        await system.module("executor").start()
        system.transport = AmqpTransport(
            f"amqps://guest:guest@localhost:{private_node.tls_port}/",
            ssl_context=context,
            connection_name=f"{private_prefix} tls client",
        )
        await system.transport.connect()
        load = SessionLoad(system.client, sessions=sized(10, 100), rate=10.0, deadline=60)
        result = await load.run()
        assert result.failures == [], result.failures[:10]
        connections = await asyncio.to_thread(
            private_node.ctl, "-q", "list_connections", "user", "ssl", "ssl_protocol"
        )
        rows = [line.split("\t") for line in connections.strip().splitlines() if line.strip()]
        ours = [row for row in rows if row and row[0] == "guest"]
        assert len(ours) >= 3, connections  # coordinator, module, this client
        assert all(row[1] == "true" for row in ours), connections
        await system.settle()
        await system.stop()
        report, _ = await system.check(result.sessions)
        report.assert_ok()
    protocols = sorted({row[2] for row in ours})
    record(
        Row(
            scenario="8c TLS end to end",
            load=f"{len(result.sessions)} sessions over amqps; {result.describe()}",
            faults=f"self-signed CA; {len(ours)} connections all TLS ({', '.join(protocols)}); "
            "untrusted client refused (CERTIFICATE_VERIFY_FAILED)",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery="n/a (no outage)",
        )
    )
