"""The browser layer itself: Debian's Chromium, driven by Playwright, loads a page
served by uvicorn in the test's event loop, runs its script, submits its form and
takes a picture of it."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.cli.conftest import System
from tests.console.browser.conftest import PageProblems, People, Served

pytestmark = pytest.mark.asyncio(loop_scope="session")

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>smoke</title></head>
<body><h1 id="title">{title}</h1>
<form method="post" action="/"><label for="name">Name</label><input id="name" name="name">
<button id="send" type="submit">Send</button></form>
<p id="script"></p><script>document.getElementById("script").textContent = "ran";</script>
</body></html>"""


async def _page(request: Request) -> HTMLResponse:
    if request.method == "POST":
        # Parsed by hand: starlette's form parser needs python-multipart.
        form = urllib.parse.parse_qs((await request.body()).decode())
        return HTMLResponse(PAGE.format(title=f"hello {form['name'][0]}"))
    return HTMLResponse(PAGE.format(title="smoke"))


async def test_chromium_loads_a_served_page_runs_its_script_and_posts_its_form(
    served: Callable[[Any], Awaitable[Served]],
    new_context: Callable[[], Awaitable[tuple[BrowserContext, PageProblems]]],
    tmp_path: Path,
) -> None:
    """The fixtures work end to end: a page served in this loop, read, scripted and
    posted by a real browser, and photographed."""
    site = await served(Starlette(routes=[Route("/", _page, methods=["GET", "POST"])]))
    context, _ = await new_context()
    page = await context.new_page()
    await page.goto(site.url)
    await expect(page.locator("#script")).to_have_text("ran")
    await page.fill("#name", "chromium")
    await page.click("#send")
    await expect(page.locator("#title")).to_have_text("hello chromium")
    picture = tmp_path / "smoke.png"
    await page.screenshot(path=str(picture))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_system_runs_on_the_tests_prefix_with_an_operator_and_an_auditor(
    system: System, people: People
) -> None:
    """The coordinator under the console answers over the bus, knows both people (the
    operator acts for every module, the auditor for none) and the sessionctl of the
    test reads the same prefix."""
    created = await system.client.create_workflow_session()
    identity = system.runtime.identity
    operator = identity.principal_for(people.operator.user)
    auditor = identity.principal_for(people.auditor.user)
    assert operator is not None
    assert operator.modules is None
    assert auditor is not None
    assert auditor.modules == frozenset()
    listed = await system.ctl("sessions", "list", "--json")
    assert listed.code == 0, listed.err
    assert str(created.session_id) in listed.out
