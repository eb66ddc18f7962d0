"""Fixtures of the console suite: a coordinator with two reference modules on the test's
own prefix, the console served on a free port of 127.0.0.1 by uvicorn in this test's
event loop (so the coordinator keeps answering while a request waits), and HTTP clients
that sign in as a broker user.

The identity map: ``guest`` is an operator (``*``); the test's auditor, a broker user of
its own, may only read (``auditor=``)."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from contracts import Topology
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from reference_modules import ReferenceModule
from sessionctl.console import ConsoleServer, ConsoleSettings
from tests.bus.conftest import BrokerUsers
from tests.cli.conftest import Result, sessionctl
from tests.support.module_system import module_system
from transport.amqp import AmqpTransport

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a server-sent event stream."""
    kind, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "":
            if data:
                yield kind, data
            kind, data = "message", ""


def csrf_of(page: str) -> str:
    """The CSRF token a page's forms carry."""
    match = CSRF.search(page)
    assert match is not None, "no form token on the page"
    return html.unescape(match.group(1))


@dataclass
class ConsoleSystem:
    prefix: str
    url: str
    store: str
    runtime: CoordinatorRuntime
    client: CoordinatorClient
    driver: AmqpTransport
    modules: list[ReferenceModule]
    server: ConsoleServer
    auditor: dict[str, str]
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    async def ctl(self, *args: str, timeout: float = 60.0) -> Result:
        """``sessionctl ARGS`` on this prefix, in its own process (as a person runs it)."""
        return await sessionctl(*args, prefix=self.prefix, url=self.url, timeout=timeout)

    def http(self) -> httpx.AsyncClient:
        """A browser-like client of the console, not signed in (closed with the test)."""
        client = httpx.AsyncClient(base_url=self.server.url, timeout=30.0)
        self.clients.append(client)
        return client

    async def signed_in(
        self,
        user: str = "guest",
        password: str = "guest",  # noqa: S107 - RabbitMQ's default user
    ) -> httpx.AsyncClient:
        """A client signed in as ``user``; its ``csrf`` attribute is the form token."""
        http = self.http()
        form = await http.get("/login")
        assert form.status_code == 200
        answer = await http.post(
            "/login",
            data={"user": user, "password": password, "csrf": csrf_of(form.text), "next": "/"},
        )
        assert answer.status_code == 303, answer.text
        page = await http.get("/sessions")
        assert page.status_code == 200, page.text
        http.headers["x-test-csrf"] = csrf_of(page.text)
        return http


def token(http: httpx.AsyncClient) -> str:
    return http.headers["x-test-csrf"]


@pytest.fixture
def users(prefix: str) -> Iterator[BrokerUsers]:
    """Broker users of this test, deleted after the console has closed their connections."""
    made = BrokerUsers(prefix)
    try:
        yield made
    finally:
        made.delete_all()


@pytest.fixture
async def console(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest, users: BrokerUsers
) -> AsyncIterator[ConsoleSystem]:
    """Coordinator (SQLite) + executor + task loop + the console, on the test's prefix."""
    name = request.node.nodeid[-150:]
    topology = Topology(prefix)
    store = f"sqlite:///{tmp_path / 'events.sqlite'}"
    auditor = users("auditor")
    identity = f"guest=*;{auditor['user']}="
    async with module_system(amqp_url, topology, store, name, identity) as parts:
        settings = ConsoleSettings(amqp_url=amqp_url, topology=topology, command_timeout=10.0)
        server = ConsoleServer(settings, "127.0.0.1", 0)
        await server.start()
        system = ConsoleSystem(
            prefix,
            amqp_url,
            store,
            parts.runtime,
            CoordinatorClient(parts.driver, topology),
            parts.driver,
            parts.modules,
            server,
            auditor,
        )
        try:
            yield system
        finally:
            for http in system.clients:
                await http.aclose()
            await server.close()
