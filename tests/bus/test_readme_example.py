"""The README's examples, run exactly as written: the block between the
``module-example`` markers (a module, whose ``main(url, stop)`` serves a coordinator on
the test's own topology prefix, ``SESSIONBUS_PREFIX``) and the block between the
``script-example`` markers (a script creating and destroying a session through
``CoordinatorClient.connect``, which takes the broker and the prefix from the
environment), each executed as a module of its own."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import types
import uuid
from pathlib import Path

import pytest

from contracts import DEFAULT_PREFIX, SessionStatus, Topology
from module_sdk import CoordinatorClient, SessionManager, Settings
from module_sdk.testing import wait_for
from tests.bus.conftest import Bus
from tests.bus.support import wait_destroyed, wait_status

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(name: str) -> types.ModuleType:
    """The README's ``name`` example block, executed as a module of its own."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text()
    assert text.count(start) == 1
    assert text.count(end) == 1
    block = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert block.startswith("```python\n")
    assert block.endswith("\n```")
    code = block.removeprefix("```python\n").removesuffix("```")
    # Only what the SDK exports: a module author or a script needs nothing else.
    imports = re.findall(r"^(?:from (\S+) import|import (\S+))", code, re.MULTILINE)
    assert {a or b for a, b in imports} <= {"asyncio", "module_sdk"}, imports
    module = types.ModuleType(f"readme_{name.replace('-', '_')}")
    module.__file__ = str(README)
    exec(compile(code, str(README), "exec"), module.__dict__)  # noqa: S102 - our own README
    return module


def readme_example() -> types.ModuleType:
    return readme_block("module-example")


@pytest.mark.broker
async def test_readme_module_example_creates_links_and_destroys(
    amqp_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONBUS_PREFIX", amqp_bus.prefix)
    example = readme_example()
    assert amqp_bus.url is not None
    async with amqp_bus.runtime() as rt:
        stop = asyncio.Event()
        served = asyncio.create_task(example.main(amqp_bus.url, stop))
        projections = rt.coordinator.projections
        await wait_for(
            lambda: "executor" in projections.modules or served.done(),
            timeout=15,
            what="the README module to register",
        )
        assert not served.done(), served
        topology = Topology(amqp_bus.prefix)
        assert await rt.transport.queue_stats(topology.module_queue("executor")) is not None

        client = await amqp_bus.client()
        sid = (await client.create_workflow_session(["open the page"])).session_id
        session = await wait_status(rt, sid, SessionStatus.ACTIVE)
        info = session.modules["executor"]
        assert info.metadata == {"engine": "chromium"}
        assert session.executor_session_id == info.session_id
        assert example.browsers == {info.session_id: f"browser for {sid}"}

        await client.destroy_workflow_session(sid)
        await wait_destroyed(rt, sid)
        assert example.browsers == {}

        stop.set()
        await asyncio.wait_for(served, 15)


@pytest.mark.broker
async def test_readme_script_example_creates_and_destroys_a_session(
    amqp_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script finds the broker and the prefix in SESSIONBUS_AMQP_URL and
    SESSIONBUS_PREFIX, creates a session the README's module takes part in, lists the
    modules and destroys the session: the module's hooks ran for it, once each."""
    assert amqp_bus.url is not None
    monkeypatch.setenv("SESSIONBUS_AMQP_URL", amqp_bus.url)
    monkeypatch.setenv("SESSIONBUS_PREFIX", amqp_bus.prefix)
    module = readme_example()
    script = readme_block("script-example")
    async with amqp_bus.runtime() as rt:
        stop = asyncio.Event()
        served = asyncio.create_task(module.main(amqp_bus.url, stop))
        await wait_for(
            lambda: "executor" in rt.coordinator.projections.modules or served.done(),
            timeout=15,
            what="the README module to register",
        )
        assert not served.done(), served

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            await asyncio.wait_for(script.main(), 30)
        lines = output.getvalue().splitlines()
        sid = uuid.UUID(lines[0].split(":", 1)[0])
        assert "  executor: required" in lines
        await wait_destroyed(rt, sid)
        assert sid in rt.coordinator.projections.recently_destroyed
        await wait_for(lambda: module.browsers == {}, timeout=10, what="the browser closed")

        stop.set()
        await asyncio.wait_for(served, 15)


class Sample(SessionManager):
    module_id = "executor"


async def test_connect_takes_the_prefix_from_sessionbus_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "amqp://guest:guest@127.0.0.1:5672/"
    monkeypatch.delenv("SESSIONBUS_PREFIX", raising=False)
    assert Sample.connect(url).topology.prefix == DEFAULT_PREFIX
    monkeypatch.setenv("SESSIONBUS_PREFIX", "tenant-a")
    assert Sample.connect(url).topology.prefix == "tenant-a"
    # What the caller says wins over the environment.
    assert Sample.connect(url, prefix="tenant-b").topology.prefix == "tenant-b"
    assert Sample.connect(url, topology=Topology("tenant-c")).topology.prefix == "tenant-c"
    both = Sample.connect(url, prefix="tenant-d", topology=Topology("tenant-c"))
    assert both.topology.prefix == "tenant-d"


def test_client_connect_reads_the_same_settings_as_the_manager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``CoordinatorClient.connect`` and ``SessionManager.connect`` take the broker,
    prefix, partitions and connection name from the environment; what the caller says
    wins; a settings object given is used as it is."""
    for name in ("SESSIONBUS_PREFIX", "SESSIONBUS_PARTITIONS", "SESSIONBUS_CONNECTION_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SESSIONBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    client = CoordinatorClient.connect()
    assert client.topology == Topology(DEFAULT_PREFIX, 1)
    assert client.own_transport
    assert client.transport.connection_name == "sessionbus-client"  # type: ignore[attr-defined]
    assert Sample.connect().transport.connection_name == "sessionbus-module-executor"  # type: ignore[attr-defined]
    nodes = ["amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:guest@127.0.0.2:5672/"]
    assert CoordinatorClient.connect(nodes).transport.url == ",".join(nodes)  # type: ignore[attr-defined]

    monkeypatch.setenv("SESSIONBUS_CONNECTION_NAME", "nightly report")
    assert CoordinatorClient.connect().transport.connection_name == "nightly report"  # type: ignore[attr-defined]

    monkeypatch.setenv("SESSIONBUS_PREFIX", "tenant-a")
    monkeypatch.setenv("SESSIONBUS_PARTITIONS", "4")
    client = CoordinatorClient.connect()
    manager = Sample.connect()
    assert client.topology == manager.topology == Topology("tenant-a", 4)
    assert CoordinatorClient.connect(prefix="tenant-b").topology == Topology("tenant-b", 4)

    settings = Settings(prefix="tenant-c", amqp_url="amqp://guest:guest@127.0.0.1:1/")
    assert CoordinatorClient.connect(settings=settings).topology == Topology("tenant-c")
    assert Sample.connect(settings=settings).topology == Topology("tenant-c")
