"""The console's sessions list over HTTP, against a real coordinator, modules and broker:
sign-in, filters, search by any id, keyset paging, live updates, and bad input."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest

from contracts import ErrorCode, SessionStatus, StandardError, WorkflowConfig
from tests.bus.support import wait_destroyed, wait_status
from tests.console.conftest import ConsoleSystem, sse_events

pytestmark = pytest.mark.broker

ROW = re.compile(r'data-testid="session-row" data-session-id="([0-9a-f-]{36})"')


def listed(page: str) -> list[str]:
    return ROW.findall(page)


async def test_pages_send_a_person_who_is_not_signed_in_to_the_sign_in_form(
    console: ConsoleSystem,
) -> None:
    http = console.http()
    answer = await http.get("/sessions?status=ACTIVE")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Fsessions%3Fstatus%3DACTIVE"
    form = await http.get("/login")
    assert form.status_code == 200
    assert 'id="login-form"' in form.text
    assert 'for="login-user"' in form.text
    assert 'for="login-password"' in form.text


async def test_a_wrong_password_is_refused_and_said_so_without_echoing_it(
    console: ConsoleSystem,
) -> None:
    http = console.http()
    form = await http.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    answer = await http.post(
        "/login",
        data={"user": "guest", "password": "not-the-password-xyz", "csrf": token.group(1)},
    )
    assert answer.status_code == 401
    assert 'id="login-error"' in answer.text
    assert "not-the-password-xyz" not in answer.text
    assert "sessionbus_console=" not in answer.headers.get("set-cookie", "")


async def test_sign_in_keeps_the_password_out_of_the_cookie_and_pages(
    console: ConsoleSystem,
) -> None:
    http = await console.signed_in()
    cookies = " ".join(f"{c.name}={c.value}" for c in http.cookies.jar)
    assert "guest:guest" not in cookies
    assert "guest" not in cookies
    page = await http.get("/sessions")
    assert 'data-testid="signed-in-user"' in page.text
    assert 'data-role="operator"' in page.text
    assert "amqp://" not in page.text
    # One broker connection per signed-in person, closed on sign-out.
    accounts = console.server.app.state.console.accounts
    assert len(accounts) == 1
    out = await http.post("/logout", data={"csrf": http.headers["x-test-csrf"]})
    assert out.status_code == 303
    assert len(accounts) == 0
    assert (await http.get("/sessions")).status_code == 303


async def test_sessions_created_over_the_bus_are_listed_with_filters_and_search(
    console: ConsoleSystem,
) -> None:
    client = console.client
    active = await client.create_workflow_session(["a"])
    await wait_status(console.runtime, active.session_id, SessionStatus.ACTIVE)
    # A session waiting for a module that never links stays INITIALIZING.
    await client.register_module("nobody", required=False)
    waiting = await client.create_workflow_session(
        ["b"], WorkflowConfig(required_modules=["executor", "nobody"], link_timeout_ms=600_000)
    )
    # A failed session stays in CLEANUP while "nobody" keeps its link.
    failed = await client.create_workflow_session(
        ["c"],
        WorkflowConfig(required_modules=["executor", "nobody"], cleanup_timeout_ms=600_000),
    )
    await client.link_module_session(failed.session_id, "nobody", uuid.uuid4())
    await wait_status(console.runtime, failed.session_id, SessionStatus.ACTIVE)
    await client.report_error(
        failed.session_id,
        StandardError(code=ErrorCode.MODULE_ERROR, message="boom"),
        module_id="executor",
    )
    await wait_status(console.runtime, failed.session_id, SessionStatus.CLEANUP)
    http = await console.signed_in()

    everything = listed((await http.get("/sessions")).text)
    assert set(everything) >= {str(s.session_id) for s in (active, waiting, failed)}
    # Newest first by default, oldest first on request.
    assert everything.index(str(waiting.session_id)) < everything.index(str(active.session_id))
    oldest = listed((await http.get("/sessions?order=oldest")).text)
    assert oldest.index(str(active.session_id)) < oldest.index(str(waiting.session_id))

    assert listed((await http.get("/sessions?status=INITIALIZING")).text) == [
        str(waiting.session_id)
    ]
    assert listed((await http.get("/sessions?errors=1")).text) == [str(failed.session_id)]
    assert listed((await http.get("/sessions?module=nobody")).text) == [str(failed.session_id)]

    # Search by a module session's id finds the workflow session it is linked to.
    state = await wait_status(console.runtime, active.session_id, SessionStatus.ACTIVE)
    executor_session = state.modules["executor"].session_id
    assert listed((await http.get(f"/sessions?q={executor_session}")).text) == [
        str(active.session_id)
    ]
    assert listed((await http.get(f"/sessions?q={active.session_id}")).text) == [
        str(active.session_id)
    ]
    assert listed((await http.get(f"/sessions?q={uuid.uuid4()}")).text) == []

    # Created between: the window around the first session only.
    created = state.created_at
    window = (
        f"created_from={created.strftime('%Y-%m-%dT%H:%M:%S.%f')}"
        f"&created_to={waiting.created_at.strftime('%Y-%m-%dT%H:%M:%S.%f')}"
    )
    assert listed((await http.get(f"/sessions?{window}")).text) == [str(active.session_id)]
    # Stale: nothing has been idle for a day.
    assert listed((await http.get("/sessions?stale=1440")).text) == []


async def test_keyset_pages_walk_every_session_once(console: ConsoleSystem) -> None:
    created = [await console.client.create_workflow_session(["p"]) for _ in range(5)]
    http = await console.signed_in()
    seen: list[str] = []
    url: str | None = "/sessions?limit=2&order=oldest"
    pages = 0
    while url is not None:
        page = (await http.get(url)).text
        seen += listed(page)
        pages += 1
        found = re.search(r'id="next-page" href="([^"]+)"', page)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert pages == 3
    assert seen == [str(s.session_id) for s in created]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("status=BOGUS", "status: 'BOGUS' is not a status"),
        ("module=Not%20A%20Module", "module: 'Not A Module' is not a module id"),
        ("created_from=yesterday", "created_from: 'yesterday' is not a date and time"),
        ("created_from=2026-01-02&created_to=2026-01-01", "created_to must be later"),
        ("limit=0", "limit: 0 is out of range"),
        ("limit=many", "limit: 'many' is not a whole number"),
        ("stale=-5", "stale: -5 is out of range"),
        ("errors=perhaps", "errors: 'perhaps' is neither on nor off"),
        ("q=not-an-id", "q: 'not-an-id' is not an id"),
        ("after=garbage", "after: 'garbage' is not a page cursor"),
        ("order=sideways", "order: 'sideways' is neither newest nor oldest"),
        ("colour=blue", "unknown parameter(s): colour"),
    ],
)
async def test_bad_query_strings_get_a_clear_400_page(
    console: ConsoleSystem, query: str, says: str
) -> None:
    http = await console.signed_in()
    answer = await http.get(f"/sessions?{query}")
    assert answer.status_code == 400
    assert 'id="error-message"' in answer.text
    assert says in answer.text.replace("&#39;", "'")
    assert "Traceback" not in answer.text


async def test_sessions_created_after_the_page_opened_arrive_by_server_sent_events(
    console: ConsoleSystem,
) -> None:
    http = await console.signed_in()
    page = await http.get("/sessions")
    assert 'data-live="on"' in page.text
    async with http.stream("GET", "/sessions/feed") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = sse_events(response)
        kind, data = await asyncio.wait_for(anext(stream), 10)
        assert kind == "ready"
        assert json.loads(data)["queue"].startswith(f"{console.prefix}.console.")
        session = await console.client.create_workflow_session(["live"])

        async def first_of_session() -> dict[str, object]:
            async for kind, data in stream:
                item = json.loads(data)
                if kind == "session" and item["session_id"] == str(session.session_id):
                    return dict(item)
            raise AssertionError("the stream ended")

        item = await asyncio.wait_for(first_of_session(), 10)
    assert item["type"] == "session.created"
    assert item["status"] == "INITIALIZING"
    assert item["version"] == 1
    assert item["actor"] == "guest"


async def test_the_live_feed_needs_a_sign_in(console: ConsoleSystem) -> None:
    answer = await console.http().get("/sessions/feed")
    assert answer.status_code == 401


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/sessions/feed?session=nope", "session: 'nope' is not an id"),
        ("/sessions/feed?since=1", "unknown parameter(s): since"),
        ("/overview/figures?window=5", "unknown parameter(s): window"),
        ("/overview?x=1", "unknown parameter(s): x"),
        ("/queues?x=1", "unknown parameter(s): x"),
        ("/dead-letters?x=1", "unknown parameter(s): x"),
    ],
)
async def test_bad_query_strings_of_the_other_pages_get_a_400(
    console: ConsoleSystem, path: str, says: str
) -> None:
    http = await console.signed_in()
    answer = await http.get(path)
    assert answer.status_code == 400
    assert says in answer.text.replace("&#39;", "'")


async def test_search_by_a_module_session_id_finds_destroyed_sessions_marked_so(
    console: ConsoleSystem,
) -> None:
    """A destroyed session holds no links: its module session's id finds it through the
    coordinator's lookup, both while the coordinator still holds the destroyed session
    and once it is older than that memory (read from the store)."""
    client, runtime = console.client, console.runtime
    projections = runtime.coordinator.projections
    http = await console.signed_in()

    async def destroyed() -> tuple[uuid.UUID, uuid.UUID]:
        made = await client.create_workflow_session(["a"])
        state = await wait_status(runtime, made.session_id, SessionStatus.ACTIVE)
        executor_session = state.modules["executor"].session_id
        await client.destroy_workflow_session(made.session_id)
        await wait_destroyed(runtime, made.session_id)
        return made.session_id, executor_session

    def row_of(page: str, sid: uuid.UUID) -> str:
        match = re.search(rf'<tr [^>]*data-session-id="{sid}".*?</tr>', page, re.S)
        assert match is not None, f"no row of {sid}"
        return match.group(0)

    old, old_executor = await destroyed()
    page = await http.get(f"/sessions?q={old_executor}")
    assert page.status_code == 200
    assert listed(page.text) == [str(old)]
    assert 'class="badge DESTROYED">destroyed<' in row_of(page.text, old)
    assert listed((await http.get(f"/sessions?q={old}")).text) == [str(old)]

    # Older than the coordinator's memory of destroyed sessions: the store's lookup.
    projections.destroyed_memory = 1
    new, _ = await destroyed()
    assert old not in projections.recently_destroyed
    await asyncio.to_thread(runtime.coordinator.save_checkpoint)
    page = await http.get(f"/sessions?q={old_executor}")
    assert listed(page.text) == [str(old)]
    assert 'class="badge DESTROYED">destroyed<' in row_of(page.text, old)
    # A live session's search is as before: no destroyed rows added.
    live = await client.create_workflow_session(["b"])
    assert listed((await http.get(f"/sessions?q={live.session_id}")).text) == [str(live.session_id)]
    assert str(new) not in listed((await http.get("/sessions")).text)
