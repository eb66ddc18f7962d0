"""The demo in its short form, the generated broker definitions on the real broker,
and frontend-api's HTTP face."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts import Topology
from coordinator.domain.identity import IdentityMap
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from module_sdk.testing import InProcessBus, wait_for
from reference_modules import Executor
from reference_modules.http import FrontendApp
from sessionctl.definitions import SEED_MODULES, definitions, module_permissions
from tests.cli.conftest import sessionctl
from tests.support.broker_admin import delete_user, management, user_url
from transport.amqp import AmqpTransport
from transport.port import AccessRefused, OutgoingMessage


@pytest.mark.broker
@pytest.mark.slow
async def test_demo_short_form_on_rabbitmq_runs_every_session_end_to_end(amqp_url: str) -> None:
    """`sessionctl demo` (modules as separate processes) finishes by itself; every
    session's chain verifies and every module cleaned up what it created."""
    result = await sessionctl("demo", "--sessions", "6", "--seed", "7", url=amqp_url, timeout=120)
    assert result.code == 0, result.out + result.err
    assert "rabbitmq" in result.out
    assert "6 ok, 0 bad" in result.out
    for module_id in SEED_MODULES:
        assert f"{module_id}" in result.out
    assert result.out.count("6 created, 6 cleaned up") == len(SEED_MODULES)


async def test_demo_runs_on_the_in_process_bus_when_the_broker_is_down() -> None:
    """With no broker reachable the demo says so plainly and still runs."""
    result = await sessionctl(
        "demo", "--sessions", "4", url="amqp://guest:guest@127.0.0.1:1/", timeout=60
    )
    assert result.code == 0, result.out + result.err
    assert "RabbitMQ is not reachable" in result.out
    assert "in-process bus" in result.out
    assert "4 ok, 0 bad" in result.out
    assert "Traceback" not in result.err


@pytest.fixture
def imported_definitions(prefix: str) -> Iterator[dict[str, str]]:
    """The generated definitions for this test's prefix, loaded into the local broker
    through the management API (users ``<prefix>-<name>``), removed afterwards."""
    names = ["coordinator", "operator", *SEED_MODULES]
    passwords = {f"{prefix}-{name}": f"pw-{uuid.uuid4().hex[:8]}" for name in names}
    doc = definitions(Topology(prefix), passwords, user_prefix=f"{prefix}-")
    management("POST", "/api/definitions", doc)
    try:
        yield passwords
    finally:
        for user in passwords:
            delete_user(user)
        for policy in doc["policies"]:
            quoted = urllib.parse.quote(policy["name"], safe="")
            with contextlib.suppress(urllib.error.HTTPError):
                management("DELETE", f"/api/policies/%2F/{quoted}")


@pytest.mark.broker
async def test_definitions_grant_each_module_exactly_what_the_sdk_uses(
    amqp_url: str, prefix: str, imported_definitions: dict[str, str]
) -> None:
    """A module connected as its own generated user runs its whole lifecycle; the same
    user may not publish events, touch another module's queue or read commands."""
    topology = Topology(prefix)
    user = f"{prefix}-executor"
    module_url = user_url(amqp_url, user, imported_definitions[user])
    coordinator_url = user_url(
        amqp_url, f"{prefix}-coordinator", imported_definitions[f"{prefix}-coordinator"]
    )
    identity = IdentityMap.parse(f"{user}=executor;guest=*")
    async with CoordinatorRuntime(
        AmqpTransport(coordinator_url, connection_name=f"{prefix} coordinator"),
        store="memory://",
        topology=topology,
        identity=identity,
        health_interval=0.5,
    ) as runtime:
        executor = Executor(
            AmqpTransport(module_url, connection_name=f"{prefix} executor"),
            topology=topology,
            own_transport=True,
            heartbeat_interval=0.3,
        )
        async with executor, AmqpTransport(amqp_url) as driver:
            client = CoordinatorClient(driver, topology)
            session = await client.create_workflow_session(["step"])
            projections = runtime.coordinator.projections
            await wait_for(
                lambda: "executor" in projections.get(session.session_id).modules,  # type: ignore[union-attr]
                timeout=15,
                what="the executor's link",
            )
            await wait_for(
                lambda: projections.is_healthy("executor", runtime.coordinator.clock.now()),
                timeout=10,
                what="the executor's heartbeat",
            )
            await client.destroy_workflow_session(session.session_id)
            await wait_for(
                lambda: session.session_id in projections.recently_destroyed,
                timeout=15,
                what="destroy",
            )
            assert executor.destroyed == 1

            own = executor.transport
            with pytest.raises(AccessRefused):
                await own.publish(
                    topology.events_exchange,
                    "session.created",
                    OutgoingMessage(b"{}", "application/json"),
                )
            with pytest.raises(AccessRefused):
                await own.declare_queue(topology.module_queue_spec("task-loop"))

            async def ignore(_: Any) -> None:
                return None

            with pytest.raises(AccessRefused):
                await own.consume(topology.commands_queue(), ignore)
    perms = module_permissions(topology, "executor")
    assert "events" not in perms["write"]


def _asgi_call(app: FrontendApp, method: str, path: str, body: bytes = b"", query: str = "") -> Any:
    async def run() -> tuple[int, Any]:
        sent: list[dict[str, Any]] = []
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "query_string": query.encode()}
        await app(scope, receive, send)
        status = sent[0]["status"]
        payload = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        return status, payload

    return run()


async def test_frontend_api_serves_session_queries_and_execute_steps() -> None:
    """The ASGI app: execute steps creates a session; queries answer; bad input gets a
    typed error with a matching HTTP status."""
    bus = InProcessBus()
    topology = Topology(f"f{uuid.uuid4().hex[:8]}")
    async with CoordinatorRuntime(
        bus.transport("guest"),
        store="memory://",
        topology=topology,
        identity=IdentityMap.parse("guest=*"),
    ) as runtime:
        transport = bus.transport("guest")
        await transport.connect()
        app = FrontendApp(CoordinatorClient(transport, topology))
        status, created = await _asgi_call(
            app, "POST", "/sessions", b'{"steps": ["open", "click"]}'
        )
        assert status == 201
        sid = created["session_id"]
        assert created["status"] == "ACTIVE"  # nothing is required on this bus
        assert (await _asgi_call(app, "GET", "/sessions"))[1] == {"session_ids": [sid]}
        status, one = await _asgi_call(app, "GET", f"/sessions/{sid}")
        assert (status, one["steps"]) == (200, ["open", "click"])
        status, state = await _asgi_call(app, "GET", f"/sessions/{sid}/status")
        assert state == {"session_id": sid, "status": "ACTIVE", "modules": {}}
        status, history = await _asgi_call(app, "GET", f"/sessions/{sid}/history")
        assert [e["version"] for e in history["events"]] == [1, 2]
        status, report = await _asgi_call(app, "GET", f"/sessions/{sid}/integrity")
        assert (status, report["workflow_session_id"], report["is_valid"]) == (200, sid, True)
        status, health = await _asgi_call(app, "GET", "/health")
        assert health["active_workflow_sessions"] == 1
        assert (await _asgi_call(app, "POST", f"/sessions/{sid}/destroy"))[0] == 202
        await wait_for(lambda: uuid.UUID(sid) in runtime.coordinator.projections.recently_destroyed)

        status, error = await _asgi_call(app, "POST", "/sessions", b'{"steps": 3}')
        assert (status, error["code"], error["field"]) == (400, "INVALID_MESSAGE", "$.steps")
        status, error = await _asgi_call(app, "GET", "/sessions/not-a-uuid")
        assert (status, error["code"]) == (400, "INVALID_ID")
        status, error = await _asgi_call(app, "GET", f"/sessions/{uuid.uuid4()}")
        assert (status, error["code"]) == (404, "UNKNOWN_SESSION")
        status, error = await _asgi_call(app, "GET", "/sessions", query="status=BOGUS")
        assert (status, error["field"]) == (400, "status")
        status, error = await _asgi_call(app, "GET", "/nowhere")
        assert status == 404
        # A known path with another method is no route either; a trailing slash is the same path.
        status, error = await _asgi_call(app, "DELETE", "/sessions")
        assert (status, error["message"]) == (404, "no route DELETE /sessions")
        assert (await _asgi_call(app, "GET", "/sessions/", query="status="))[0] == 200
        status, error = await _asgi_call(app, "POST", "/sessions", b"x" * (2 << 20))
        assert (status, error["code"]) == (413, "MESSAGE_TOO_LARGE")
        await transport.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.broker
async def test_frontend_api_process_serves_http_over_rabbitmq(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    """`python -m reference_modules frontend-api --http-port N` is a real module
    process with a real HTTP server proxying to the coordinator."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
    async with CoordinatorRuntime(
        AmqpTransport(amqp_url, connection_name=f"{prefix} coordinator"),
        store="memory://",
        topology=Topology(prefix),
        identity=IdentityMap.parse("guest=*"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reference_modules",
            "frontend-api",
            "--amqp-url",
            amqp_url,
            "--prefix",
            prefix,
            "--http-port",
            str(port),
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert process.stderr is not None
        try:
            ready = b""
            while b"ready" not in ready:
                ready = await asyncio.wait_for(process.stderr.readline(), 30)
                assert ready, "frontend-api exited before it was ready"

            def post() -> Any:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/sessions", data=b'{"steps": ["x"]}', method="POST"
                )
                with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                    return response.status, json.loads(response.read())

            status, body = await asyncio.to_thread(post)
            assert status == 201
            # frontend-api is required and has linked: the session is ACTIVE.
            assert body["session"]["required_modules"] == ["frontend-api"]
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
    assert process.returncode == 0
