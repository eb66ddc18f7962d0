"""Fixtures of the console's browser tests: Debian's Chromium driven by Playwright
against a real coordinator, the reference modules and the console, each on the test's
own prefix and broker users.

- ``browser``: one headless Chromium for the whole run (``/usr/bin/chromium``, or
  ``SESSIONBUS_TEST_CHROMIUM``). A missing browser fails the test with the command that
  installs it; it never turns into a skip.
- ``people``: broker users of the test, an operator and an auditor, with the broker
  permissions a deployment gives ``sessionctl``'s user; the coordinator's identity map
  tells them apart (``operator=*`` may act for every module, ``auditor=`` for none).
- ``served``: serves any ASGI application with uvicorn on a free 127.0.0.1 port, in the
  test's own event loop, so the coordinator, the modules, the console and the browser
  all answer while a test awaits any one of them.

Playwright's objects belong to the event loop that made them, and the browser is made
once: every test of this folder and every fixture here runs in the session's loop
(``pytestmark = pytest.mark.asyncio(loop_scope="session")`` in each test module).

Screenshot tests (marker ``screenshots``: ``make screenshots``) write the README's
pictures; they are deselected unless ``-m`` names them, so ``make test`` leaves
``docs/screenshots`` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from contracts import Topology
from coordinator.domain.identity import IdentityMap
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from reference_modules import Executor, ReferenceModule, TaskLoop
from sessionctl.definitions import operator_permissions
from tests.cli.conftest import System
from tests.support.broker_admin import delete_user, management
from transport.amqp import AmqpTransport

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("SESSIONBUS_TEST_CHROMIUM", "/usr/bin/chromium")
INSTALL = "bash deploy/local/browser.sh (as root: apt-get install chromium)"
# How long a page may take to show what a test waits for. Generous: the browser shares
# two cores with the broker, the database and the modules; a wait ends as soon as the
# page shows it, so this costs nothing when things are fast.
WAIT_MS = 20_000
# A laptop's width: the README's pictures and the layout the issue asks for.
VIEWPORT = {"width": 1280, "height": 800}

expect.set_options(timeout=WAIT_MS)


# --- the browser -------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Screenshot tests run only when asked for by ``-m``: they rewrite files of the
    repository (``docs/screenshots``), which a test run must not."""
    if "screenshots" in (config.getoption("markexpr", "") or ""):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("screenshots") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def chromium_binary() -> str:
    """Debian's Chromium, checked present (the test fails otherwise, saying how to
    install it)."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run {INSTALL}", pytrace=False)
    return CHROMIUM


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium, launched once per run (a launch costs seconds here)."""
    binary = chromium_binary()
    # Chromium refuses to start its sandbox as root (CI and the shared machines run as
    # root); the pages it opens are the test's own.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=binary, headless=True, args=args
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class PageProblems:
    """What went wrong inside a page: uncaught script errors and refused content
    (the console's content security policy), collected as they happen."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"script error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                self.errors.append(f"console: {msg.text}")
                if msg.type == "error" and "Content Security Policy" in msg.text
                else None
            ),
        )


@pytest_asyncio.fixture(loop_scope="session")
async def new_context(
    browser: Browser,
) -> AsyncIterator[Callable[[], Awaitable[tuple[BrowserContext, PageProblems]]]]:
    """Makes browser contexts (each its own cookies: one person each), closed at the
    end of the test, which fails if a page of theirs had a script error."""
    made: list[tuple[BrowserContext, PageProblems]] = []

    async def make() -> tuple[BrowserContext, PageProblems]:
        context = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        context.set_default_timeout(WAIT_MS)
        problems = PageProblems()
        context.on("page", problems.watch)
        made.append((context, problems))
        return context, problems

    yield make
    for context, _ in made:
        with contextlib.suppress(Exception):
            await context.close()
    errors = [e for _, problems in made for e in problems.errors]
    assert not errors, "the page had errors:\n" + "\n".join(errors)


# --- serving an application ----------------------------------------------------------------


class _Server(uvicorn.Server):
    # The test process's signals stay pytest's.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Served:
    url: str
    port: int


@pytest_asyncio.fixture(loop_scope="session")
async def served() -> AsyncIterator[Callable[[Any], Awaitable[Served]]]:
    """``await served(app)``: the ASGI app served by uvicorn on a free 127.0.0.1 port
    (lifespan on) until the end of the test."""
    servers: list[tuple[_Server, Any, socket.socket]] = []

    async def serve(app: Any) -> Served:
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        servers.append((server, task, sock))
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("the server stopped while starting")
            await asyncio.sleep(0.01)
        return Served(f"http://127.0.0.1:{port}", port)

    yield serve
    for server, task, sock in reversed(servers):
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()


# --- who signs in ------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    user: str
    password: str


@dataclass
class People:
    """The test's broker users: an operator and an auditor."""

    operator: Person
    auditor: Person

    def identity(self, *others: str) -> str:
        """The coordinator's identity map: the operator may act for every module, the
        auditor for none (it reads and changes nothing); ``others`` as given."""
        return ";".join([*others, f"{self.operator.user}=*", f"{self.auditor.user}="])


PASSWORD = "sessionbus-console-test"


def _create_user(name: str, password: str, permissions: dict[str, str]) -> None:
    quoted = urllib.parse.quote(name, safe="")
    management("PUT", f"/api/users/{quoted}", {"password": password, "tags": ""})
    management("PUT", f"/api/permissions/%2F/{quoted}", permissions)


@pytest.fixture
def people(prefix: str, amqp_url: str) -> Iterator[People]:
    """An operator and an auditor, broker users ``<prefix>-operator`` and
    ``<prefix>-auditor`` with what a deployment gives ``sessionctl``'s user on this
    prefix (sessionctl.definitions); deleted at the end of the test."""
    permissions = operator_permissions(Topology(prefix))
    made = People(
        operator=Person(f"{prefix}-operator", PASSWORD),
        auditor=Person(f"{prefix}-auditor", PASSWORD),
    )
    try:
        for person in (made.operator, made.auditor):
            _create_user(person.user, person.password, permissions)
        yield made
    finally:
        for person in (made.operator, made.auditor):
            delete_user(person.user)


# --- the system under the console ----------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def system(
    amqp_url: str, prefix: str, people: People, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[System]:
    """Coordinator (SQLite store, the people's identity map) + executor + task-loop on
    the test's prefix, and a client of the test's own (``guest``, acting for every
    module) to make sessions with."""
    name = request.node.nodeid[-150:]
    topology = Topology(prefix)
    store = f"sqlite:///{tmp_path / 'events.sqlite'}"
    runtime = CoordinatorRuntime(
        AmqpTransport(amqp_url, connection_name=f"{name} coordinator"),
        store=store,
        topology=topology,
        identity=IdentityMap.parse(people.identity("guest=*")),
        health_interval=0.5,
    )
    await runtime.start()
    modules: list[ReferenceModule] = []
    driver = AmqpTransport(amqp_url, connection_name=f"{name} driver")
    try:
        for cls in (Executor, TaskLoop):
            module = cls(
                AmqpTransport(amqp_url, connection_name=f"{name} {cls.module_id}"),
                topology=topology,
                own_transport=True,
                heartbeat_interval=0.5,
            )
            modules.append(module)
            await module.start()
        await driver.connect()
        yield System(prefix, amqp_url, store, runtime, CoordinatorClient(driver, topology), modules)
    finally:
        for module in modules:
            await module.close()
        await driver.close()
        await runtime.close()
