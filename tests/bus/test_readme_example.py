"""The README's "module in 20 lines", run exactly as written: the block between the
``module-example`` markers is executed as a module, and its ``main(url, stop)`` serves a
coordinator on the test's own topology prefix (``SESSIONBUS_PREFIX``)."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest

from contracts import DEFAULT_PREFIX, SessionStatus, Topology
from module_sdk import SessionManager
from module_sdk.testing import wait_for
from tests.bus.conftest import Bus
from tests.bus.support import wait_destroyed, wait_status

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- module-example:start -->", "<!-- module-example:end -->"


def readme_example() -> types.ModuleType:
    """The README's example block, executed as a module of its own."""
    text = README.read_text()
    assert text.count(START) == 1
    assert text.count(END) == 1
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block.startswith("```python\n")
    assert block.endswith("\n```")
    code = block.removeprefix("```python\n").removesuffix("```")
    module = types.ModuleType("readme_module_example")
    module.__file__ = str(README)
    exec(compile(code, str(README), "exec"), module.__dict__)  # noqa: S102 - our own README
    return module


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
