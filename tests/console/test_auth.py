"""Sign-in and its limits: the sign-in form's own token, no redirect off the console, a
forged cookie, idle sign-ins closed with their broker connection, and pages that say
so when no coordinator answers."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import pytest

from contracts import Topology
from sessionctl.console import ConsoleServer, ConsoleSettings
from sessionctl.definitions import operator_permissions
from tests.bus.conftest import BrokerUsers
from tests.console.conftest import ConsoleSystem, csrf_of
from tests.support.broker_admin import delete_user, management, user_connections, user_url

pytestmark = pytest.mark.broker


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_the_sign_in_form_needs_its_own_token(console: ConsoleSystem) -> None:
    http = console.http()
    await http.get("/login")
    refused = await http.post("/login", data={"user": "guest", "password": "guest"})
    assert refused.status_code == 403
    assert "nothing was done" in refused.text
    # A token from another browser's form is not this one's.
    other = console.http()
    token = csrf_of((await other.get("/login")).text)
    refused = await console.http().post(
        "/login", data={"user": "guest", "password": "guest", "csrf": token}
    )
    assert refused.status_code == 403


@pytest.mark.parametrize(
    ("next_path", "lands"),
    [
        ("/dead-letters", "/dead-letters"),
        ("//evil.example/", "/sessions"),
        ("https://evil.example/", "/sessions"),
        ("/\\evil.example", "/sessions"),
    ],
)
async def test_after_sign_in_the_console_goes_only_to_its_own_pages(
    console: ConsoleSystem, next_path: str, lands: str
) -> None:
    http = console.http()
    token = csrf_of((await http.get("/login")).text)
    answer = await http.post(
        "/login", data={"user": "guest", "password": "guest", "csrf": token, "next": next_path}
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == lands


async def test_a_forged_cookie_is_not_a_sign_in(console: ConsoleSystem) -> None:
    http = await console.signed_in()
    (cookie,) = [c for c in http.cookies.jar if c.name == "sessionbus_console"]
    key, _, mac = cookie.value.rpartition(".")
    forged = console.http()
    forged.cookies.set("sessionbus_console", f"{key}.{'0' * len(mac)}")
    assert (await forged.get("/sessions")).status_code == 303
    forged.cookies.set("sessionbus_console", f"x{key}.{mac}")
    assert (await forged.get("/sessions")).status_code == 303


async def test_an_idle_sign_in_is_closed_with_its_broker_connection(
    console: ConsoleSystem, users: BrokerUsers
) -> None:
    person = users("idle")
    settings = ConsoleSettings(
        amqp_url=console.url, topology=console.topology, idle_timeout=1.0, live=False
    )
    async with ConsoleServer(settings) as server:
        http = console.http()
        http.base_url = server.url  # type: ignore[assignment]
        token = csrf_of((await http.get("/login")).text)
        answer = await http.post(
            "/login", data={"user": person["user"], "password": person["password"], "csrf": token}
        )
        assert answer.status_code == 303

        async def connected() -> bool:
            return bool(await asyncio.to_thread(user_connections, person["user"]))

        async def closed() -> bool:
            return not await connected()

        await eventually(connected, "the person's broker connection")
        await eventually(closed, "the idle sign-in's connection to close")
        assert len(server.app.state.console.accounts) == 0
        assert (await http.get("/sessions")).status_code == 303


async def test_pages_say_so_when_no_coordinator_answers(console: ConsoleSystem) -> None:
    settings = ConsoleSettings(
        amqp_url=console.url,
        topology=Topology(f"{console.prefix}x"),
        command_timeout=1.0,
        live=False,
    )
    async with ConsoleServer(settings) as server:
        http = console.http()
        http.base_url = server.url  # type: ignore[assignment]
        token = csrf_of((await http.get("/login")).text)
        answer = await http.post(
            "/login", data={"user": "guest", "password": "guest", "csrf": token}
        )
        assert answer.status_code == 303
        page = await http.get("/sessions")
        assert page.status_code == 503
        assert "No coordinator answered" in page.text
        assert 'data-role="unknown to the coordinator"' in page.text
        assert "Traceback" not in page.text


def _user_with(name: str, permissions: dict[str, str]) -> None:
    quoted = urllib.parse.quote(name, safe="")
    management("PUT", f"/api/users/{quoted}", {"password": PASSWORD, "tags": ""})
    management("PUT", f"/api/permissions/%2F/{quoted}", permissions)


PASSWORD = "sessionbus-console-feed"


async def test_the_operator_user_of_the_definitions_may_run_the_live_feed(
    console: ConsoleSystem,
) -> None:
    """With what ``sessionctl definitions`` gives the operator, the console declares its
    own queue of events; a user who may declare nothing gets pages that say live
    updates are off, and every page still works."""
    topology = console.topology
    operator, nobody = f"{console.prefix}-feedop", f"{console.prefix}-feednone"
    _user_with(operator, operator_permissions(topology))
    _user_with(nobody, {**operator_permissions(topology), "configure": "^$"})
    try:
        for user, live in ((operator, "on"), (nobody, "off")):
            settings = ConsoleSettings(
                amqp_url=console.url,
                topology=topology,
                feed_url=user_url(console.url, user, PASSWORD),
            )
            async with ConsoleServer(settings) as server:
                http = console.http()
                http.base_url = server.url  # type: ignore[assignment]
                token = csrf_of((await http.get("/login")).text)
                answer = await http.post(
                    "/login", data={"user": "guest", "password": "guest", "csrf": token}
                )
                assert answer.status_code == 303
                page = await http.get("/sessions")
                assert page.status_code == 200
                assert f'data-live="{live}"' in page.text
                if live == "off":
                    assert "live updates are off" in page.text
                    assert (await http.get("/sessions/feed")).status_code == 204
    finally:
        delete_user(operator)
        delete_user(nobody)
