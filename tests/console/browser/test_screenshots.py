"""The README's pictures of the console (``make screenshots``): every view, taken by the
browser tests' own fixtures against a real coordinator, broker and modules with a few
sessions and a dead letter in them, at a laptop's width."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator

import pytest
from playwright.async_api import Page, expect

from contracts import SessionStatus
from tests.console.browser.conftest import (
    SCREENSHOTS,
    Console,
    active_session,
    eventful_session,
    poison,
)
from tests.support import services

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.screenshots]


async def _shoot(page: Page, name: str) -> None:
    # The caret and animations off, so a picture changes only when the page does.
    await page.screenshot(
        path=str(SCREENSHOTS / f"{name}.png"), animations="disabled", caret="hide"
    )


@pytest.fixture
def prefix(amqp_url: str) -> Iterator[str]:
    """A plain prefix for the pictures (it shows in every page's header); its
    topology is deleted afterwards, as the suite's own prefixes are."""
    value = "example"
    yield value
    services.delete_topology(amqp_url, value)


async def _traffic(console: Console, sid: uuid.UUID) -> None:
    """Activity on one session, a few commands a second, until cancelled."""
    while True:
        await console.system.client.record_activity(sid, module_id="executor")
        await asyncio.sleep(0.2)


async def test_screenshots_of_every_view(console: Console) -> None:
    """Writes docs/screenshots/<view>.png for the sign-in, sessions, session, dead
    letters, modules, queues and overview pages, each once it shows its data."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    system = console.system
    client = system.client
    shown = await eventful_session(system)
    await active_session(system)
    paused = await active_session(system)
    await client.update_session_status(paused, SessionStatus.PAUSED, reason="waiting for input")
    await poison(system, "poison-1")

    signin = await console.page()
    await signin.goto(f"{console.url}/login")
    await signin.fill("#login-user", console.people.operator.user)
    await _shoot(signin, "sign-in")

    page = await console.operator()
    await page.goto(f"{console.url}/sessions")
    for sid in (shown, paused):
        await expect(page.locator(f"#session-{sid}")).to_be_visible()
    await _shoot(page, "sessions")

    await page.goto(f"{console.url}/sessions/{shown}")
    await expect(page.locator("[data-testid=timeline-row]").first).to_be_visible()
    await _shoot(page, "session")
    timeline = page.locator("section", has=page.locator("#timeline"))
    await timeline.screenshot(
        path=str(SCREENSHOTS / "session-timeline.png"), animations="disabled", caret="hide"
    )

    await page.goto(f"{console.url}/dead-letters")
    await expect(page.locator("[data-testid=dead-letter]")).to_have_count(1)
    await page.locator("[data-testid=dead-letter] details").last.evaluate("d => { d.open = true; }")
    await _shoot(page, "dead-letters")

    await page.goto(f"{console.url}/modules")
    await expect(page.locator("[data-testid=module-row][data-healthy=yes]")).to_have_count(2)
    await _shoot(page, "modules")

    await page.goto(f"{console.url}/queues")
    await expect(page.locator("[data-testid=queue-row]").first).to_be_visible()
    await _shoot(page, "queues")

    # The overview samples its figures every 2 s while open: some traffic meanwhile,
    # so its charts have a line to draw.
    traffic = asyncio.get_running_loop().create_task(_traffic(console, shown))
    try:
        await page.goto(f"{console.url}/overview")
        await page.wait_for_function(
            """() => {
                const line = document.querySelector("#chart-events polyline");
                return line !== null && line.getAttribute("points").split(" ").length >= 5;
            }""",
            timeout=60_000,
        )
        await _shoot(page, "overview")
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic

    for name in ("sign-in", "sessions", "session", "dead-letters", "modules", "queues"):
        assert (SCREENSHOTS / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
