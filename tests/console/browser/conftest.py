"""Fixtures of the console's browser tests: Debian's Chromium driven by Playwright
against a real coordinator, the reference modules and the console, each on the test's
own prefix and broker users.

- ``browser``: one headless Chromium for the whole run (``/usr/bin/chromium``, or
  ``SESSIONBUS_TEST_CHROMIUM``). A missing browser fails the test with the command that
  installs it; it never turns into a skip.
- ``people``: broker users of the test, an operator and an auditor, with the broker
  permissions a deployment gives ``sessionctl``'s user; the coordinator's identity map
  tells them apart (``operator=*`` may act for every module, ``auditor=`` for none).
- ``system``: a coordinator (SQLite store) and the executor and task-loop reference
  modules on the test's prefix; ``console``: the console (``sessionctl console``'s
  server) for it on a free 127.0.0.1 port, in the test's own event loop, so the
  coordinator, the modules, the console and the browser all answer while a test awaits
  any one of them; pages signed in through its sign-in form.

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
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from contracts import SessionStatus, StandardError, Topology
from coordinator.domain.identity import IdentityMap
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient
from module_sdk.testing import wait_for
from reference_modules import Executor, ReferenceModule, TaskLoop
from sessionctl import admin
from sessionctl.definitions import operator_permissions
from tests.cli.conftest import System
from tests.support import services
from tests.support.broker_admin import delete_user, management
from transport.amqp import AmqpTransport
from transport.port import OutgoingMessage

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
        # As `sessionctl coordinator` runs it: its loop keeps the health figures fresh
        # (the relay's published position: the overview's relay lag).
        stop = asyncio.Event()
        serving = asyncio.get_running_loop().create_task(runtime.serve_forever(stop))
        try:
            yield System(
                prefix, amqp_url, store, runtime, CoordinatorClient(driver, topology), modules
            )
        finally:
            stop.set()
            await serving
    finally:
        for module in modules:
            await module.close()
        await driver.close()
        await runtime.close()


# --- the console ---------------------------------------------------------------------------

# Counts the live feeds a page opens and marks each once the console says it is
# subscribed (its ``ready`` event): a test then changes something only once the page
# is listening, instead of hoping the stream is open by then. Injected by the browser
# before the page's own script runs.
FEED_PROBE = """
(() => {
  const Original = window.EventSource;
  if (!Original) { return; }
  window.__feeds = [];
  function Probed(url, options) {
    const source = new Original(url, options);
    const entry = { url: String(url), ready: false, events: 0 };
    window.__feeds.push(entry);
    source.addEventListener("ready", () => { entry.ready = true; });
    source.addEventListener("session", () => { entry.events += 1; });
    return source;
  }
  Probed.prototype = Original.prototype;
  window.EventSource = Probed;
})();
"""


@dataclass
class Console:
    """The console of the test, in front of ``system``; pages signed in through its
    own sign-in form."""

    url: str
    system: System
    people: People
    new_context: Callable[[], Awaitable[tuple[BrowserContext, PageProblems]]]
    contexts: list[BrowserContext] = field(default_factory=list)

    async def page(self) -> Page:
        """A page of a new browser context (its own cookies), signed in as nobody."""
        context, _ = await self.new_context()
        self.contexts.append(context)
        await context.add_init_script(FEED_PROBE)
        return await context.new_page()

    async def close_pages(self) -> None:
        """Close the pages first: the server then waits for no open live stream."""
        for context in self.contexts:
            with contextlib.suppress(Exception):
                await context.close()

    async def signed_in(self, person: Person) -> Page:
        """A page signed in as ``person`` through the sign-in form, on the sessions list."""
        page = await self.page()
        await page.goto(f"{self.url}/login")
        await page.fill("#login-user", person.user)
        await page.fill("#login-password", person.password)
        await page.click("#login-submit")
        await expect(page.locator("#signed-in-user")).to_contain_text(person.user)
        return page

    async def operator(self) -> Page:
        return await self.signed_in(self.people.operator)

    async def auditor(self) -> Page:
        return await self.signed_in(self.people.auditor)


async def wait_listening(page: Page) -> None:
    """Until the page's live feed is subscribed at the console."""
    await page.wait_for_function(
        "() => (window.__feeds || []).some((feed) => feed.ready)", timeout=WAIT_MS
    )


@pytest_asyncio.fixture(loop_scope="session")
async def console(
    system: System,
    people: People,
    new_context: Callable[[], Awaitable[tuple[BrowserContext, PageProblems]]],
) -> AsyncIterator[Console]:
    """The console (``sessionctl console``'s server, in this loop) on a free port of
    127.0.0.1, for the test's coordinator, with the management API for its queues."""
    from sessionctl.console import ConsoleServer, ConsoleSettings  # noqa: PLC0415

    settings = ConsoleSettings(
        amqp_url=system.url,
        topology=Topology(system.prefix),
        management_url=services.management_target(),
        command_timeout=15.0,
    )
    async with ConsoleServer(settings, "127.0.0.1", 0) as server:
        made = Console(server.url, system, people, new_context)
        try:
            yield made
        finally:
            await made.close_pages()


# --- what the tests put on the bus ---------------------------------------------------------


async def active_session(system: System) -> uuid.UUID:
    """A workflow session both reference modules have linked (ACTIVE)."""
    sid = (await system.client.create_workflow_session()).session_id
    projections = system.runtime.coordinator.projections
    await wait_for(
        lambda: (s := projections.get(sid)) is not None and s.status is SessionStatus.ACTIVE,
        timeout=20,
        what="an ACTIVE session",
    )
    return sid


async def eventful_session(system: System) -> uuid.UUID:
    """An ACTIVE session with a pause, a resume, an activity and a (non-fatal) error
    after its creation and links."""
    sid = await active_session(system)
    client = system.client
    await client.update_session_status(sid, SessionStatus.PAUSED, reason="paused for a look")
    await client.update_session_status(sid, SessionStatus.ACTIVE, reason="resumed")
    await client.record_activity(sid, module_id="executor")
    await client.report_error(
        sid,
        StandardError(code="MODULE_ERROR", message="a page did not load"),
        module_id="executor",
        fatal=False,
    )
    return sid


async def poison(system: System, message_id: str) -> int:
    """A malformed command on the commands queue: the coordinator dead-letters it.
    Returns its offset once it is listed as a dead letter."""
    await system.client.transport.publish(
        "",
        system.runtime.topology.commands_queue(),
        OutgoingMessage(b"{not json", "application/json", message_id=message_id, user_id="guest"),
    )
    return await dead_letter_listed(system, message_id)


async def dead_letter_listed(system: System, message_id: str, after: int = -1) -> int:
    """The offset of the dead letter ``message_id`` once one is listed at an offset
    later than ``after`` (the coordinator counts a rejection before it has dead-lettered
    the message, so the count says nothing about the listing)."""
    deadline = time.monotonic() + 15
    while True:
        letters = await admin.browse_dead_letters(system.client.transport, system.runtime.topology)
        offsets = [
            letter.offset
            for letter in letters
            if letter.message_id == message_id and letter.offset is not None
        ]
        if offsets and max(offsets) > after:
            return max(offsets)
        if time.monotonic() > deadline:
            raise TimeoutError(f"dead letter {message_id} not listed within 15 s")
        await asyncio.sleep(0.05)
