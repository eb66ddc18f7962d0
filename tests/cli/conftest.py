"""Fixtures of the sessionctl suite: a running coordinator with two reference modules
on the test's own prefix, and a way to run ``sessionctl`` as the user would, in its own
process, while this test's event loop keeps the coordinator answering."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contracts import Topology
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from reference_modules import ReferenceModule
from tests.support.module_system import module_system
from tests.support.processes import CtlResult, run_sessionctl

Result = CtlResult


@dataclass
class System:
    prefix: str
    url: str
    store: str
    runtime: CoordinatorRuntime
    client: CoordinatorClient
    modules: list[ReferenceModule]

    async def ctl(
        self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> Result:
        return await sessionctl(*args, prefix=self.prefix, url=self.url, timeout=timeout, env=env)


async def sessionctl(
    *args: str,
    prefix: str | None = None,
    url: str | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``sessionctl ARGS`` in a subprocess without blocking the event loop."""
    return await run_sessionctl(*args, prefix=prefix, url=url, env=env, timeout=timeout)


@pytest.fixture
async def system(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[System]:
    """Coordinator (SQLite store) + executor + task-loop on the test's prefix."""
    name = request.node.nodeid[-150:]
    topology = Topology(prefix)
    store = f"sqlite:///{tmp_path / 'events.sqlite'}"
    async with module_system(amqp_url, topology, store, name, "guest=*") as parts:
        client = CoordinatorClient(parts.driver, topology)
        yield System(prefix, amqp_url, store, parts.runtime, client, parts.modules)
