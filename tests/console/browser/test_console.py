"""The console in a real browser (Debian's Chromium), against a real coordinator,
RabbitMQ and the reference modules: what issue 15 asks the pages to show and refuse.

Every wait is on something the page or the bus shows, with a timeout; the pages are
read through the ids and ``data-testid`` attributes the console's templates give."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import Page, expect

from contracts import SessionStatus
from module_sdk.testing import wait_for
from tests.console.browser.conftest import (
    Console,
    active_session,
    dead_letter_listed,
    eventful_session,
    poison,
    wait_listening,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _timeline(page: Page) -> list[tuple[int, str]]:
    """(version, type) of every timeline row, top to bottom."""
    rows = page.locator("[data-testid=timeline-row]")
    await expect(rows.first).to_be_visible()
    return [
        (
            int(await row.get_attribute("data-version") or 0),
            await row.get_attribute("data-type") or "",
        )
        for row in await rows.all()
    ]


def _history_page(console: Console, sid: uuid.UUID, query: str = "") -> str:
    return f"{console.url}/sessions/{sid}{query}"


# --- sessions ------------------------------------------------------------------------------


async def test_sessions_created_over_the_bus_appear_live_in_the_list(console: Console) -> None:
    """With the sessions list open (and listening), sessions created over the bus show up
    as rows, and a status change shows in its row, without the page being reloaded."""
    page = await console.operator()
    await page.goto(f"{console.url}/sessions")
    await expect(page.locator("#live-status")).to_have_attribute("data-live", "on")
    await wait_listening(page)
    await page.evaluate("() => { window.__notReloaded = true; }")

    created = [(await console.system.client.create_workflow_session()).session_id for _ in range(2)]
    for sid in created:
        await expect(page.locator(f"#session-{sid}")).to_be_visible()
    projections = console.system.runtime.coordinator.projections
    await wait_for(
        lambda: (s := projections.get(created[0])) is not None and s.status is SessionStatus.ACTIVE,
        timeout=20,
        what="the modules' links (ACTIVE)",
    )
    await console.system.client.update_session_status(
        created[0], SessionStatus.PAUSED, reason="live check"
    )
    badge = page.locator(f"#session-{created[0]} [data-testid=session-status]")
    await expect(badge).to_have_text("PAUSED")
    assert await page.evaluate("() => window.__notReloaded === true")
    # What the page drew matches what it serves on a fresh load.
    await page.reload()
    await expect(page.locator(f"#session-{created[0]} [data-testid=session-status]")).to_have_text(
        "PAUSED"
    )
    await expect(page.locator(f"#session-{created[1]}")).to_be_visible()


async def test_a_sessions_timeline_shows_its_events_in_order(console: Console) -> None:
    """The session page's timeline lists the session's stored events, oldest first,
    version by version, as the coordinator's history has them; the error is marked."""
    system = console.system
    sid = await eventful_session(system)
    page = await console.operator()
    await page.goto(_history_page(console, sid))
    await expect(page.locator("#session-id")).to_have_text(str(sid))
    shown = await _timeline(page)
    history = (await system.client.get_session_history(sid)).events
    # Modules may add events after the page was drawn: the page shows a prefix.
    assert shown == [(e.version, e.type) for e in history[: len(shown)]]
    assert [v for v, _ in shown] == list(range(1, len(shown) + 1))
    types = [t for _, t in shown]
    assert types[0] == "session.created"
    ours = [
        t
        for t in types
        if t in {"session.status-changed", "session.activity-recorded", "session.error-reported"}
    ]
    assert ours[-4:] == [
        "session.status-changed",
        "session.status-changed",
        "session.activity-recorded",
        "session.error-reported",
    ]
    error_row = page.locator("[data-testid=timeline-row][data-type='session.error-reported']")
    await expect(error_row).to_have_class(re.compile(r"\bhas-error\b"))
    await expect(error_row).to_contain_text("a page did not load")
    await expect(page.locator("#chain-verdict")).to_have_attribute("data-ok", "yes")


async def test_the_as_of_view_matches_sessionctl_history_as_of(console: Console) -> None:
    """The state as of a version (by link) and as of a time (by the form) is what
    ``sessionctl sessions history --version`` / ``--as-of`` says it is."""
    system = console.system
    sid = await active_session(system)
    await system.client.update_session_status(sid, SessionStatus.PAUSED, reason="before")
    before = (await system.client.get_session_history(sid)).events
    # ``--as-of`` takes whole seconds: the next events must fall after a second that
    # the first ones are all within. Wait for the clock to pass it (a wait on the clock,
    # checked below, not on the system).
    cut = before[-1].occurred_at.replace(microsecond=0) + timedelta(seconds=1)
    await asyncio.sleep(max(0.0, (cut - datetime.now(UTC)).total_seconds()) + 0.01)
    await system.client.update_session_status(sid, SessionStatus.ACTIVE, reason="after")
    await system.client.destroy_workflow_session(sid, "as-of check")
    after = (await system.client.get_session_history(sid)).events
    assert after[len(before)].occurred_at > cut

    page = await console.operator()
    middle = max(2, len(before) - 1)
    cases = [
        (("--version", str(middle)), None),
        (("--as-of", cut.strftime("%Y-%m-%dT%H:%M:%S")), cut),
    ]
    for args, at in cases:
        ctl = await system.ctl("sessions", "history", str(sid), *args, "--json")
        assert ctl.code == 0, ctl.err
        expected = json.loads(ctl.out)["history"]
        if at is None:
            await page.goto(_history_page(console, sid, f"?version={middle}"))
        else:
            await page.goto(_history_page(console, sid))
            await page.fill("#as-of-time", at.strftime("%Y-%m-%dT%H:%M:%S.000"))
            await page.click("#as-of-submit")
        state = page.locator("#as-of-state")
        await expect(state).to_be_visible()
        assert int(await state.get_attribute("data-events") or -1) == len(expected["events"])
        assert int(await state.get_attribute("data-version") or -1) == expected["state"]["version"]
        assert await state.get_attribute("data-status") == expected["state"]["status"]
        linked = await page.locator("#as-of-linked").inner_text()
        assert linked == (", ".join(sorted(expected["state"]["modules"])) or "none")
    assert len(json.loads(ctl.out)["history"]["events"]) == len(before)


async def test_a_flipped_byte_in_a_stored_event_shows_the_broken_version(
    console: Console,
) -> None:
    """One byte of one stored event changed behind the store's back: the session page
    says the chain is broken and names that version, in the verdict and the timeline."""
    system = console.system
    sid = await eventful_session(system)
    victim = 3
    system_store = system.store.removeprefix("sqlite:///")
    _flip_hash_digit(system_store, sid, victim)
    page = await console.operator()
    await page.goto(_history_page(console, sid))
    verdict = page.locator("#chain-verdict")
    await expect(verdict).to_have_attribute("data-ok", "no")
    await expect(verdict).to_have_attribute("data-first-bad-version", str(victim))
    await expect(verdict).to_contain_text(f"BROKEN at version {victim}")
    await expect(page.locator(f"#event-v{victim}")).to_have_class(re.compile(r"\bbroken\b"))
    ctl = await system.ctl("sessions", "history", str(sid), "--verify", "--json")
    assert json.loads(ctl.out)["verdict"]["first_bad_version"] == victim


def _flip_hash_digit(sqlite_path: str, sid: uuid.UUID, version: int) -> None:
    """Change one digit of the stored hash of event ``version`` (still valid JSON)."""
    lite = sqlite3.connect(sqlite_path, timeout=10)
    try:
        with lite:
            (state,) = lite.execute(
                "SELECT state FROM stored_events "
                "WHERE originator_id = ? AND originator_version = ?",
                (sid.hex, version),
            ).fetchone()
            state = bytes(state)
            marker = b'"hash":"'
            at = state.index(marker) + len(marker)
            digit = b"1" if state[at : at + 1] != b"1" else b"2"
            lite.execute(
                "UPDATE stored_events SET state = ? "
                "WHERE originator_id = ? AND originator_version = ?",
                (state[:at] + digit + state[at + 1 :], sid.hex, version),
            )
    finally:
        lite.close()


# --- dead letters --------------------------------------------------------------------------


async def test_a_poison_message_appears_under_dead_letters_and_a_replay_replays_it(
    console: Console,
) -> None:
    """The malformed command is listed with its reason and raw body; Replay on the page
    sends it back to the coordinator (which, still malformed, rejects it once more) and
    the replayed letter is no longer listed."""
    system = console.system
    offset = await poison(system, "poison-1")
    page = await console.operator()
    await page.goto(f"{console.url}/dead-letters")
    letter = page.locator("[data-testid=dead-letter][data-message-id=poison-1]")
    await expect(letter).to_have_count(1)
    await expect(letter).to_have_attribute("data-offset", str(offset))
    group = page.locator("[data-testid=dead-letter-group]")
    await expect(group).to_have_attribute("data-code", "INVALID_MESSAGE")
    await expect(group).to_have_attribute("data-rejected-by", "coordinator")
    await expect(letter.locator("[data-testid=dead-letter-body]")).to_contain_text(
        "{not json", use_inner_text=False
    )

    rejected = system.runtime.server.rejected
    await page.click(f"#replay-{offset}")
    await expect(page.locator("[data-testid=flash-ok]")).to_contain_text("Replayed 1")
    await expect(page.locator(f"#letter-{offset}")).to_have_count(0)
    # Back at the coordinator, still malformed: rejected again, and a new dead letter
    # (a later offset), not the settled one.
    await wait_for(lambda: system.runtime.server.rejected > rejected, timeout=15, what="the replay")
    again = await dead_letter_listed(system, "poison-1", after=offset)
    await page.goto(f"{console.url}/dead-letters")
    await expect(letter).to_have_count(1)
    await expect(letter).to_have_attribute("data-offset", str(again))


# --- who may do what -----------------------------------------------------------------------


async def _refused(page: Page) -> None:
    """The page says the action was refused (403) and shows no stack trace."""
    message = page.locator("#error-message")
    await expect(message).to_be_visible()
    await expect(message).to_have_attribute("data-status", "403")
    assert "Traceback" not in await page.content()


async def test_an_auditors_sign_in_cannot_replay_or_destroy(console: Console) -> None:
    """Signed in as the auditor (``auditor=`` in the identity map: acts for no module),
    the pages read, but Replay, Discard, Destroy and Repair are refused, and nothing
    changed: the letter is still listed and never reached the coordinator again, the
    session's history is as it was."""
    system = console.system
    sid = await active_session(system)
    offset = await poison(system, "poison-auditor")
    page = await console.auditor()

    await page.goto(f"{console.url}/dead-letters")
    letter = page.locator("[data-testid=dead-letter][data-message-id=poison-auditor]")
    await expect(letter).to_have_attribute("data-offset", str(offset))
    rejected = system.runtime.server.rejected
    await page.click(f"#replay-{offset}")
    await _refused(page)
    await page.goto(f"{console.url}/dead-letters")
    await page.click(f"#discard-{offset}")
    if await page.locator("#confirm-submit").count():
        await page.click("#confirm-submit")
    await _refused(page)
    await page.goto(f"{console.url}/dead-letters")
    await expect(page.locator(f"#letter-{offset}")).to_have_count(1)
    assert system.runtime.server.rejected == rejected

    events = len((await system.client.get_session_history(sid)).events)
    await page.goto(_history_page(console, sid))
    await page.click("#destroy-submit")
    if await page.locator("#confirm-submit").count():
        await page.click("#confirm-submit")
    await _refused(page)
    await page.goto(_history_page(console, sid))
    await page.click("#repair-submit")
    await _refused(page)
    session = await system.client.get_workflow_session(sid)
    assert session is not None
    assert session.status is SessionStatus.ACTIVE
    assert not session.destroyed
    assert len((await system.client.get_session_history(sid)).events) == events


# --- bad input -----------------------------------------------------------------------------

NOT_AN_ID = "not-a-session"


def _bad_queries(sid: uuid.UUID) -> list[tuple[str, str]]:
    """(path and query, a word the message must name) for every query string."""
    return [
        ("/sessions?status=SLEEPING", "status"),
        ("/sessions?module=Not%20A%20Module!", "module"),
        ("/sessions?created_from=yesterday", "created_from"),
        ("/sessions?created_to=2026-13-40", "created_to"),
        ("/sessions?created_from=2026-01-02&created_to=2026-01-01", "created_to"),
        ("/sessions?stale=-5", "stale"),
        ("/sessions?stale=soon", "stale"),
        ("/sessions?errors=maybe", "errors"),
        ("/sessions?order=sideways", "order"),
        ("/sessions?q=12345", "q"),
        ("/sessions?limit=100000", "limit"),
        ("/sessions?after=garbage", "after"),
        ("/sessions?colour=blue", "colour"),
        (f"/sessions/{NOT_AN_ID}", NOT_AN_ID),
        (f"/sessions/{uuid.uuid4()}", "no workflow session"),
        (f"/sessions/{sid}?version=0", "version"),
        (f"/sessions/{sid}?version=seven", "version"),
        (f"/sessions/{sid}?as_of=last%20week", "as_of"),
        (f"/sessions/{sid}?colour=blue", "colour"),
        ("/sessions/feed?session=nope", "session"),
        ("/modules?colour=blue", "colour"),
        ("/queues?colour=blue", "colour"),
        ("/overview?colour=blue", "colour"),
        ("/dead-letters?colour=blue", "colour"),
        ("/no-such-page", "Not Found"),
    ]


async def _post_form(page: Page, action: str, fields: dict[str, str]) -> int | None:
    """Submit a form the page builds (as a hand-edited form would be), with this
    sign-in's form token unless ``fields`` sets its own; the status of the answer."""
    async with page.expect_navigation() as navigation:
        await page.evaluate(
            """([action, fields]) => {
                const token = document.querySelector("input[name=csrf]");
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                const all = Object.assign({csrf: token ? token.value : ""}, fields);
                for (const [name, value] of Object.entries(all)) {
                    const input = document.createElement("input");
                    input.type = "hidden";
                    input.name = name;
                    input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            [action, fields],
        )
    response = await navigation.value
    return response.status if response else None


async def _clear_message(page: Page, status: int | None, word: str, where: str) -> str | None:
    """What is wrong with the page shown for bad input, or None: a 4xx page saying
    what was wrong (naming ``word``), no stack trace, no 500."""
    message = page.locator("#error-message, #login-error")
    if not await message.count():
        return f"{where}: no error message on the page ({status})"
    text = await message.first.inner_text()
    content = await page.content()
    problems = []
    if status is None or not 400 <= status < 500:
        problems.append(f"status {status}")
    if word.lower() not in text.lower():
        problems.append(f"message {text!r} does not name {word!r}")
    if "Traceback" in content or 'File "' in content:
        problems.append("a stack trace")
    return f"{where}: {', '.join(problems)}" if problems else None


async def test_bad_input_in_every_form_and_query_string_gets_a_clear_message(
    console: Console,
) -> None:
    """Every query string and form field the console reads, given something it cannot
    take: a 4xx page naming what was wrong; never a stack trace, never a 500; and the
    sign-in form says why it refused."""
    system = console.system
    sid = await active_session(system)
    await poison(system, "poison-bad-input")
    page = await console.operator()
    problems: list[str] = []
    for path, word in _bad_queries(sid):
        response = await page.goto(f"{console.url}{path}")
        problem = await _clear_message(page, response.status if response else None, word, path)
        if problem:
            problems.append(problem)

    forms: list[tuple[str, str, dict[str, str], str]] = [
        ("/dead-letters", "/dead-letters/replay", {"offset": "abc"}, "offset"),
        ("/dead-letters", "/dead-letters/replay", {}, "offset"),
        ("/dead-letters", "/dead-letters/replay", {"offset": "1", "all": "1"}, "all"),
        ("/dead-letters", "/dead-letters/replay", {"all": "perhaps"}, "all"),
        ("/dead-letters", "/dead-letters/discard", {"offset": "-1"}, "offset"),
        ("/dead-letters", "/dead-letters/discard", {"offset": "1", "confirm": "sure"}, "confirm"),
        (f"/sessions/{sid}", f"/sessions/{sid}/destroy", {"confirm": "sure"}, "confirm"),
        (f"/sessions/{sid}", f"/sessions/{NOT_AN_ID}/destroy", {}, NOT_AN_ID),
        (f"/sessions/{sid}", f"/sessions/{NOT_AN_ID}/repair", {}, NOT_AN_ID),
        (f"/sessions/{sid}", f"/sessions/{sid}/repair", {"csrf": "forged"}, "token"),
        ("/sessions", "/logout", {"csrf": ""}, "token"),
    ]
    for start, action, fields, word in forms:
        await page.goto(f"{console.url}{start}")
        status = await _post_form(page, action, fields)
        problem = await _clear_message(page, status, word, f"POST {action} {fields}")
        if problem:
            problems.append(problem)

    # The sign-in form, as a person fills it (the browser's own checks let these pass).
    signin = await console.page()
    for user, password, word in [
        (console.people.operator.user, "wrong-password", "refused"),
        ("nobody-" + uuid.uuid4().hex[:6], "whatever", "refused"),
    ]:
        await signin.goto(f"{console.url}/login")
        await signin.fill("#login-user", user)
        await signin.fill("#login-password", password)
        async with signin.expect_response(lambda r: r.request.method == "POST") as answer:
            await signin.click("#login-submit")
        status = (await answer.value).status
        problem = await _clear_message(signin, status, word, f"sign-in as {user}")
        if problem:
            problems.append(problem)
    await signin.goto(f"{console.url}/login")
    status = await _post_form(signin, "/login", {"user": "", "password": ""})
    problem = await _clear_message(signin, status, "required", "empty sign-in")
    if problem:
        problems.append(problem)
    # Nothing was changed by any of it.
    session = await system.client.get_workflow_session(sid)
    assert session is not None
    assert session.status is SessionStatus.ACTIVE
    assert not problems, "\n".join(problems)


# --- every view ----------------------------------------------------------------------------

# What a page must not have: text or markup outside its header and main part (a
# template's block left open spills into the title or the body's attributes), the same
# id twice (labels, links and these tests find elements by id).
PAGE_SHAPE = """() => {
    const ids = [...document.querySelectorAll("[id]")].map((e) => e.id);
    const twice = ids.filter((id, i) => ids.indexOf(id) !== i);
    const stray = [...document.body.childNodes]
        .filter((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim() !== "")
        .map((n) => n.textContent.trim().slice(0, 40));
    const children = [...document.body.children].map((e) => e.tagName.toLowerCase());
    return {twice, stray, children, page: document.body.dataset.page, title: document.title};
}"""


async def test_every_view_is_a_well_formed_page(console: Console) -> None:
    """Each view (sign-in, sessions, a session, dead letters, modules, queues,
    overview) is one page as the layout has it: its name and title, the skip link, the
    header and the main part and nothing else in the body, no id used twice."""
    system = console.system
    sid = await eventful_session(system)
    await poison(system, "poison-shape")
    prefix = system.prefix
    signin = await console.page()
    await signin.goto(f"{console.url}/login")
    page = await console.operator()
    views = [
        (signin, "/login", "login", "Sign in"),
        (page, "/sessions", "sessions", "Sessions"),
        (page, f"/sessions/{sid}", "session", f"Session {sid}"),
        (page, "/dead-letters", "dead-letters", "Dead letters"),
        (page, "/modules", "modules", "Modules"),
        (page, "/queues", "queues", "Queues"),
        (page, "/overview", "overview", "Overview"),
    ]
    problems: list[str] = []
    for view, path, name, title in views:
        response = await view.goto(f"{console.url}{path}")
        assert response is not None
        assert response.status == 200, (path, await view.locator("#main").inner_text())
        await expect(view.locator("#main h1")).to_be_visible()
        shape = await view.evaluate(PAGE_SHAPE)
        expected = {
            "twice": [],
            "stray": [],
            "children": ["a", "header", "main"],
            "page": name,
            "title": f"{title} · {prefix}",
        }
        wrong = {k: v for k, v in shape.items() if v != expected[k]}
        if wrong:
            problems.append(f"{path}: {wrong}")
    assert not problems, "\n".join(problems)
