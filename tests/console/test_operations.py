"""The console's operations pages over HTTP: dead letters (grouped by reason, headers,
decoded body or raw bytes, replay one / a group / all, discard with confirmation, refused
to an auditor), modules, queues and the overview."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest

from contracts import SessionStatus
from module_sdk.testing import wait_for
from sessionctl import admin
from tests.bus.support import wait_status
from tests.console.conftest import ConsoleSystem, token
from transport.port import OutgoingMessage, TransportError

pytestmark = pytest.mark.broker

LETTER = re.compile(r'data-testid="dead-letter" data-offset="(\d+)" data-message-id="([^"]*)"')


async def poison(console: ConsoleSystem, message_id: str, body: bytes) -> None:
    """A command the coordinator cannot read: it dead-letters it with its reason. Returns
    once the letter is listed (the coordinator counts the rejection before it has
    dead-lettered the message)."""
    await console.driver.publish(
        "",
        console.topology.commands_queue(),
        OutgoingMessage(body, "application/json", message_id=message_id, user_id="guest"),
    )
    deadline = time.monotonic() + 15
    while message_id not in {d.message_id for d in await letters(console)}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"dead letter {message_id} not listed within 15 s")
        await asyncio.sleep(0.05)


async def letters(console: ConsoleSystem) -> list[admin.DeadLetter]:
    return await admin.browse_dead_letters(console.driver, console.topology)


async def test_dead_letters_are_grouped_with_headers_and_bodies(console: ConsoleSystem) -> None:
    await poison(console, "poison-text", b"{not json")
    await poison(console, "poison-bytes", b"\xff\xfe\x00binary")
    await poison(console, "poison-json", b'{"command": "unknown"}')
    http = await console.signed_in()
    page = await http.get("/dead-letters")
    assert page.status_code == 200
    text = page.text
    assert 'data-testid="dead-letter-count" data-total="3"' in text
    assert {m for _, m in LETTER.findall(text)} == {"poison-text", "poison-bytes", "poison-json"}
    groups = re.findall(r'data-testid="dead-letter-group" data-code="([A-Z_]+)"', text)
    assert groups
    assert set(groups) == {"INVALID_MESSAGE"}
    assert "x-sessionbus-reject-reason" in text  # headers shown
    assert 'data-kind="bytes (hex; undecodable)"' in text  # raw bytes where nothing decodes
    assert "ff fe 00 62" in text
    assert 'data-kind="JSON"' in text
    # Listing changed nothing.
    assert len(await letters(console)) == 3


async def test_replay_one_a_group_and_all(console: ConsoleSystem) -> None:
    for n in range(3):
        await poison(console, f"poison-{n}", b"{not json")
    http = await console.signed_in()
    page = (await http.get("/dead-letters")).text
    offsets = {m: int(o) for o, m in LETTER.findall(page)}
    rejected = console.runtime.server.rejected
    # One.
    done = await http.post(
        "/dead-letters/replay", data={"csrf": token(http), "offset": str(offsets["poison-0"])}
    )
    assert done.status_code == 303
    page = (await http.get("/dead-letters")).text
    assert "Replayed 1 dead letter(s); 2 left." in page
    # The replayed command went back to the coordinator (and, still malformed, came back).
    await wait_for(
        lambda: console.runtime.server.rejected > rejected, timeout=10, what="the replay"
    )
    # A group: the two letters of the page's first group form.
    group = re.search(
        r'<form method="post" action="/dead-letters/replay" id="replay-group-1">(.*?)</form>',
        page,
        re.S,
    )
    assert group is not None
    chosen = [int(o) for o in re.findall(r'name="offset" value="(\d+)"', group.group(1))]
    assert offsets["poison-1"] in chosen
    assert offsets["poison-2"] in chosen
    done = await http.post(
        "/dead-letters/replay", data={"csrf": token(http), "offset": [str(o) for o in chosen]}
    )
    assert done.status_code == 303
    assert "Replayed" in (await http.get("/dead-letters")).text
    # All (whatever came back meanwhile).
    done = await http.post("/dead-letters/replay", data={"csrf": token(http), "all": "1"})
    assert done.status_code == 303
    for letter in await letters(console):
        assert letter.offset not in offsets.values()


async def test_discard_asks_for_confirmation_first(console: ConsoleSystem) -> None:
    await poison(console, "poison-d", b"{not json")
    (letter,) = await letters(console)
    http = await console.signed_in()
    ask = await http.post(
        "/dead-letters/discard", data={"csrf": token(http), "offset": str(letter.offset)}
    )
    assert ask.status_code == 200
    assert 'id="confirm-form"' in ask.text
    assert f'name="offset" value="{letter.offset}"' in ask.text
    assert len(await letters(console)) == 1
    done = await http.post(
        "/dead-letters/discard",
        data={"csrf": token(http), "offset": str(letter.offset), "confirm": "1"},
    )
    assert done.status_code == 303
    assert "Discarded 1 dead letter(s); 0 left." in (await http.get("/dead-letters")).text
    assert await letters(console) == []


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({}, "choose the dead letters"),
        ({"offset": "7", "all": "1"}, "choose the dead letters"),
        ({"offset": "seven"}, "offset: 'seven' is not a whole number"),
        ({"offset": "-1"}, "offset: -1 is out of range"),
        ({"all": "maybe"}, "all: 'maybe' is neither on nor off"),
    ],
)
async def test_bad_dead_letter_forms_get_a_clear_400(
    console: ConsoleSystem, data: dict[str, str], says: str
) -> None:
    http = await console.signed_in()
    for path in ("/dead-letters/replay", "/dead-letters/discard"):
        answer = await http.post(path, data={"csrf": token(http), **data})
        assert answer.status_code == 400
        assert says in answer.text.replace("&#39;", "'")


async def test_an_auditor_sees_dead_letters_but_cannot_replay_or_discard(
    console: ConsoleSystem,
) -> None:
    await poison(console, "poison-a", b"{not json")
    (letter,) = await letters(console)
    auditor = await console.signed_in(console.auditor["user"], console.auditor["password"])
    page = await auditor.get("/dead-letters")
    assert page.status_code == 200
    assert 'data-message-id="poison-a"' in page.text
    rejected = console.runtime.server.rejected
    for path, extra in (
        ("/dead-letters/replay", {}),
        ("/dead-letters/replay", {"all": "1"}),
        ("/dead-letters/discard", {"confirm": "1"}),
    ):
        data = {"csrf": token(auditor), **extra}
        if "all" not in extra:
            data["offset"] = str(letter.offset)
        refused = await auditor.post(path, data=data)
        assert refused.status_code == 403
        assert "may only read" in refused.text
    assert [d.offset for d in await letters(console)] == [letter.offset]
    assert console.runtime.server.rejected == rejected


async def test_modules_page_lists_registered_modules_with_health(console: ConsoleSystem) -> None:
    await wait_for(
        lambda: all(
            console.runtime.coordinator.projections.is_healthy(
                m, console.runtime.coordinator.clock.now()
            )
            for m in ("executor", "task-loop")
        ),
        timeout=10,
        what="both modules healthy",
    )
    http = await console.signed_in()
    page = await http.get("/modules")
    assert page.status_code == 200
    for module_id in ("executor", "task-loop"):
        assert (
            f'data-testid="module-row" data-module-id="{module_id}" data-healthy="yes"' in page.text
        )
    instances = re.findall(r'data-testid="module-instances">(\d+)<', page.text)
    assert instances == ["1", "1"]
    assert (await http.get("/modules?x=1")).status_code == 400


async def test_queues_page_lists_the_prefix_queues_and_the_audit_stream(
    console: ConsoleSystem,
) -> None:
    session = await console.client.create_workflow_session(["q"])
    await wait_status(console.runtime, session.session_id, SessionStatus.ACTIVE)
    await console.runtime.wait_published()
    published = console.runtime.coordinator.projections.position
    http = await console.signed_in()
    page = await http.get("/queues")
    assert page.status_code == 200
    for name in ("commands", "dlq", "module.executor", "module.task-loop"):
        assert f'data-queue="{console.prefix}.{name}"' in page.text
    # Every event published is in the audit stream, from offset 0 on.
    span = re.search(r'data-first-offset="(\d+)"\s+data-last-offset="(\d+)"', page.text)
    assert span is not None
    assert int(span.group(1)) == 0
    assert int(span.group(2)) == published - 1


async def test_queues_page_says_when_the_audit_stream_could_not_be_read(
    console: ConsoleSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed read of the audit stream's ends does not take the queue figures down
    with it: the page is served and says what was not read, and why."""

    async def unreadable(*args: object, **kwargs: object) -> admin.StreamSpan:
        raise TransportError("the stream's leader is not available")

    monkeypatch.setattr(admin, "audit_stream_span", unreadable)
    http = await console.signed_in()
    page = await http.get("/queues")
    assert page.status_code == 200
    assert f'data-queue="{console.prefix}.commands"' in page.text
    assert "not read: the stream&#39;s leader is not available" in page.text


async def test_overview_shows_the_coordinator_figures(console: ConsoleSystem) -> None:
    session = await console.client.create_workflow_session(["o"])
    await wait_status(console.runtime, session.session_id, SessionStatus.ACTIVE)
    http = await console.signed_in()
    page = await http.get("/overview")
    assert page.status_code == 200
    assert 'id="overview-figures"' in page.text
    assert 'data-status="ACTIVE">1<' in page.text
    figures = (await http.get("/overview/figures")).json()
    health = await console.client.get_coordinator_health()
    assert figures["sessions_active"] == health.active_workflow_sessions == 1
    assert figures["sessions_by_status"] == {"ACTIVE": 1}
    assert figures["store_position"] >= 1
    assert set(figures["modules"]) == {"executor", "task-loop"}
    # The commands answered so far: the create, the links, these reads, and counting.
    assert figures["commands_handled"] >= 3
    later = (await http.get("/overview/figures")).json()
    assert later["commands_handled"] > figures["commands_handled"]


async def test_the_console_answers_without_nagle_so_a_body_does_not_wait_for_an_ack(
    console: ConsoleSystem,
) -> None:
    """A kept-alive connection's responses went out in two writes, head and body; with
    Nagle on, the body waited for the client's delayed ACK (40 ms a page). Every
    connection the console accepts has TCP_NODELAY."""
    http = await console.signed_in()
    assert (await http.get("/sessions")).status_code == 200
    connections = console.server.connections()
    assert connections, "no open connection seen by the console"
    for sock in connections:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_every_page_sends_security_headers_and_assets_come_from_the_package(
    console: ConsoleSystem,
) -> None:
    http = await console.signed_in()
    page = await http.get("/sessions")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # What the page cost the server, as a number a benchmark or a browser can read.
    timing = re.fullmatch(r"app;dur=(\d+\.\d)", page.headers["server-timing"])
    assert timing is not None
    assert float(timing.group(1)) > 0
    assert "http://" not in re.sub(r'https?://www\.w3\.org[^"]*', "", page.text)
    for asset in ("/static/console.css", "/static/console.js"):
        answer = await http.get(asset)
        assert answer.status_code == 200
        assert "http://" not in answer.text.replace("http://www.w3.org/2000/svg", "")
