"""A session's page over HTTP: its tree, its timeline in order with errors marked, the
state as of a version or a time (the same as ``sessionctl sessions history``), the
hash-chain verdict naming a tampered version, the integrity report, and the actions
(destroy, repair) with their CSRF token and the coordinator's identity rules."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import uuid
from pathlib import Path

import pytest

from contracts import ErrorCode, SessionStatus, StandardError, StatusChanged, WorkflowConfig
from tests.bus.support import wait_status
from tests.console.conftest import ConsoleSystem, token

pytestmark = pytest.mark.broker

TIMELINE_ROW = re.compile(
    r'id="event-v(\d+)" data-testid="timeline-row" data-version="\d+" '
    r'data-type="([a-z.-]+)"\s+class="([^"]*)"'
)


def timeline(page: str) -> list[tuple[int, str, str]]:
    return [(int(v), kind, cls.strip()) for v, kind, cls in TIMELINE_ROW.findall(page)]


async def active_session(console: ConsoleSystem) -> uuid.UUID:
    session = await console.client.create_workflow_session(["a", "b"])
    await wait_status(console.runtime, session.session_id, SessionStatus.ACTIVE)
    return session.session_id


async def test_the_page_shows_the_tree_and_the_timeline_in_order_with_errors_marked(
    console: ConsoleSystem,
) -> None:
    sid = await active_session(console)
    await console.client.report_error(
        sid,
        StandardError(code=ErrorCode.MODULE_ERROR, message="a recoverable hiccup"),
        module_id="task-loop",
        fatal=False,
    )
    history = await console.client.get_session_history(sid)
    http = await console.signed_in()
    page = (await http.get(f"/sessions/{sid}")).text
    rows = timeline(page)
    assert [v for v, _, _ in rows] == [e.version for e in history.events]
    assert [kind for _, kind, _ in rows] == [e.type for e in history.events]
    errors = [kind for _, kind, cls in rows if "has-error" in cls]
    assert errors == ["session.error-reported"]
    assert "a recoverable hiccup" in page
    assert 'id="session-tree"' in page
    for module_id in ("executor", "task-loop"):
        assert f'data-testid="tree-module" data-module-id="{module_id}"' in page
    assert 'id="chain-verdict" class="ok-box" data-testid="chain-verdict" data-ok="yes"' in page
    assert 'data-testid="integrity-report" data-valid="yes"' in page


async def test_state_as_of_a_version_or_a_time_is_what_sessionctl_history_says(
    console: ConsoleSystem,
) -> None:
    sid = await active_session(console)
    history = await console.client.get_session_history(sid)
    http = await console.signed_in()
    # As of version 2.
    page = (await http.get(f"/sessions/{sid}?version=2")).text
    cli = await console.ctl("sessions", "history", str(sid), "--version", "2", "--json")
    assert cli.code == 0, cli.err
    expected = json.loads(cli.out)["history"]["state"]
    assert f'data-version="{expected["version"]}"' in page
    assert f'data-status="{expected["status"]}"' in page
    later = [v for v, _, cls in timeline(page) if "later" in cls]
    assert later == [e.version for e in history.events if e.version > 2]
    # As of a time: that of the second event, to the second (sessionctl's --as-of
    # takes whole seconds).
    second = history.events[1].occurred_at.replace(microsecond=0)
    at = second.strftime("%Y-%m-%dT%H:%M:%S")
    page = (await http.get(f"/sessions/{sid}?as_of={at}")).text
    cli = await console.ctl("sessions", "history", str(sid), "--as-of", at, "--json")
    assert cli.code == 0, cli.err
    expected_history = json.loads(cli.out)["history"]
    match = re.search(
        r'data-testid="as-of-state"\s+data-version="(\d+)"\s+data-status="(\w*)"\s+data-events="(\d+)"',
        page,
    )
    assert match is not None
    state = expected_history["state"]
    assert int(match.group(1)) == (state["version"] if state else 0)
    assert match.group(2) == (state["status"] if state else "")
    assert int(match.group(3)) == len(expected_history["events"])


async def test_a_flipped_byte_in_a_stored_event_names_the_broken_version(
    console: ConsoleSystem,
) -> None:
    sid = await active_session(console)
    history = await console.client.get_session_history(sid)
    bad = history.events[1]
    # Tamper with the stored event of version 2 (its actor), as an attacker with the
    # database file would: the hash chain no longer adds up from there.
    path = Path(console.store.removeprefix("sqlite:///"))

    def tamper() -> None:
        with sqlite3.connect(path) as db:
            (state,) = db.execute(
                "SELECT state FROM stored_events WHERE originator_id = ? "
                "AND originator_version = ?",
                (sid.hex, bad.version),
            ).fetchone()
            flipped = bytes(state).replace(b'"actor":"guest"', b'"actor":"guesT"', 1)
            assert flipped != bytes(state)
            db.execute(
                "UPDATE stored_events SET state = ? WHERE originator_id = ? "
                "AND originator_version = ?",
                (flipped, sid.hex, bad.version),
            )

    await asyncio.to_thread(tamper)
    http = await console.signed_in()
    page = (await http.get(f"/sessions/{sid}")).text
    assert f'data-ok="no" data-first-bad-version="{bad.version}"' in page
    broken = [v for v, _, cls in timeline(page) if "broken" in cls]
    assert broken == [bad.version]


async def test_destroy_asks_for_confirmation_then_starts_cleanup(console: ConsoleSystem) -> None:
    sid = await active_session(console)
    http = await console.signed_in()
    ask = await http.post(f"/sessions/{sid}/destroy", data={"csrf": token(http)})
    assert ask.status_code == 200
    assert 'id="confirm-form"' in ask.text
    assert (await console.client.get_workflow_session(sid)).status is SessionStatus.ACTIVE  # type: ignore[union-attr]
    done = await http.post(f"/sessions/{sid}/destroy", data={"csrf": token(http), "confirm": "1"})
    assert done.status_code == 303
    assert done.headers["location"] == f"/sessions/{sid}"
    page = (await http.get(f"/sessions/{sid}")).text
    assert f"Cleanup of {sid} started." in page
    history = await console.client.get_session_history(sid)
    (cleanup,) = [
        e
        for e in history.events
        if isinstance(e.event, StatusChanged) and e.event.new_status is SessionStatus.CLEANUP
    ]
    assert cleanup.actor == "guest"


async def test_repair_reports_what_it_did(console: ConsoleSystem) -> None:
    sid = await active_session(console)
    http = await console.signed_in()
    done = await http.post(f"/sessions/{sid}/repair", data={"csrf": token(http)})
    assert done.status_code == 303
    page = (await http.get(f"/sessions/{sid}")).text
    assert 'data-testid="flash-ok"' in page
    assert "Repair: nothing to repair" in page
    assert "Integrity now: valid." in page


async def test_actions_without_the_form_token_are_refused_and_change_nothing(
    console: ConsoleSystem,
) -> None:
    sid = await active_session(console)
    http = await console.signed_in()
    for data in ({"confirm": "1"}, {"csrf": "forged"}, {"csrf": "forged", "confirm": "1"}):
        answer = await http.post(f"/sessions/{sid}/destroy", data=data)
        assert answer.status_code == 403
        assert "nothing was done" in answer.text
    answer = await http.post(f"/sessions/{sid}/repair", data={"csrf": ""})
    assert answer.status_code == 403
    # Another person's token is not this one's.
    other = await console.signed_in()
    answer = await http.post(
        f"/sessions/{sid}/destroy", data={"csrf": token(other), "confirm": "1"}
    )
    assert answer.status_code == 403
    session = await console.client.get_workflow_session(sid)
    assert session is not None
    assert session.status is SessionStatus.ACTIVE


async def test_an_auditor_may_read_but_not_destroy_or_repair(console: ConsoleSystem) -> None:
    sid = await active_session(console)
    before = len((await console.client.get_session_history(sid)).events)
    auditor = await console.signed_in(console.auditor["user"], console.auditor["password"])
    page = await auditor.get(f"/sessions/{sid}")
    assert page.status_code == 200
    assert 'data-role="read only"' in page.text
    refused = await auditor.post(
        f"/sessions/{sid}/destroy", data={"csrf": token(auditor), "confirm": "1"}
    )
    assert refused.status_code == 403
    assert "FORBIDDEN" in refused.text
    assert "may only read" in refused.text
    refused = await auditor.post(f"/sessions/{sid}/repair", data={"csrf": token(auditor)})
    assert refused.status_code == 403
    session = await console.client.get_workflow_session(sid)
    assert session is not None
    assert session.status is SessionStatus.ACTIVE
    assert len((await console.client.get_session_history(sid)).events) == before


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/sessions/not-a-uuid", 400, "session id: 'not-a-uuid' is not an id"),
        ("/sessions/{sid}?version=0", 400, "version: 0 is out of range"),
        ("/sessions/{sid}?version=two", 400, "version: 'two' is not a whole number"),
        ("/sessions/{sid}?as_of=noon", 400, "as_of: 'noon' is not a date and time"),
        ("/sessions/{sid}?colour=red", 400, "unknown parameter(s): colour"),
        (f"/sessions/{uuid.UUID(int=7)}", 404, "no workflow session"),
        ("/no-such-page", 404, "Not Found"),
    ],
)
async def test_bad_paths_and_query_strings_get_a_clear_page(
    console: ConsoleSystem, path: str, status: int, says: str
) -> None:
    sid = await active_session(console)
    http = await console.signed_in()
    answer = await http.get(path.format(sid=sid))
    assert answer.status_code == status
    assert 'id="error-message"' in answer.text
    assert says in answer.text.replace("&#39;", "'")
    assert "Traceback" not in answer.text


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b"confirm=1", "application/json", "expected a form"),
        (b"csrf=%ff%fe&confirm=1", "application/x-www-form-urlencoded", "the form cannot be read"),
        (b"x" * 70_000, "application/x-www-form-urlencoded", "larger than"),
    ],
)
async def test_malformed_forms_get_a_clear_400_page(
    console: ConsoleSystem, body: bytes, content_type: str, says: str
) -> None:
    sid = await active_session(console)
    http = await console.signed_in()
    answer = await http.post(
        f"/sessions/{sid}/destroy", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 400
    assert says in answer.text
    session = await console.client.get_workflow_session(sid)
    assert session is not None
    assert session.status is SessionStatus.ACTIVE


async def test_a_failed_session_shows_its_failure(console: ConsoleSystem) -> None:
    await console.client.register_module("nobody", required=False)
    session = await console.client.create_workflow_session(
        ["f"], WorkflowConfig(required_modules=["executor", "nobody"], link_timeout_ms=600_000)
    )
    await console.client.update_session_status(
        session.session_id, SessionStatus.FAILED, reason="given up by hand"
    )
    http = await console.signed_in()
    page = (await http.get(f"/sessions/{session.session_id}")).text
    failed = [kind for _, kind, cls in timeline(page) if "has-error" in cls]
    assert "session.status-changed" in failed
    assert 'data-testid="tree-missing" data-module-id="nobody"' in page
