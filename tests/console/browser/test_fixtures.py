"""The browser layer itself: Debian's Chromium, driven by Playwright, signs in to the
console served in the test's event loop, as each of the test's people, beside a
coordinator whose identity map tells them apart."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.console.browser.conftest import Console

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_operator_and_the_auditor_sign_in_through_the_consoles_form(
    console: Console,
) -> None:
    """Each person signs in through the sign-in form in a context of their own (their
    own cookies); the coordinator takes the operator for an operator and the auditor
    for read only, and sessionctl of the test reads the same prefix."""
    created = await console.system.client.create_workflow_session()
    operator = await console.operator()
    auditor = await console.auditor()
    for page, person, role in [
        (operator, console.people.operator, "operator"),
        (auditor, console.people.auditor, "read only"),
    ]:
        await page.goto(f"{console.url}/sessions")
        who = page.locator("#signed-in-user")
        await expect(who).to_contain_text(person.user)
        await expect(who).to_have_attribute("data-role", role)
        await expect(page.locator(f"#session-{created.session_id}")).to_be_visible()
    listed = await console.system.ctl("sessions", "list", "--json")
    assert listed.code == 0, listed.err
    assert str(created.session_id) in listed.out


async def test_a_page_not_signed_in_is_sent_to_the_sign_in_form(console: Console) -> None:
    """Without a sign-in, a page of the console leads to the sign-in form (and back to
    that page once signed in)."""
    page = await console.page()
    await page.goto(f"{console.url}/modules")
    await expect(page.locator("#login-form")).to_be_visible()
    await page.fill("#login-user", console.people.auditor.user)
    await page.fill("#login-password", console.people.auditor.password)
    await page.click("#login-submit")
    await expect(page.locator("[data-testid=module-row]")).to_have_count(2)
    assert page.url.endswith("/modules")
