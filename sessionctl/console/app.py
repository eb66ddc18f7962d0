"""The console's Starlette application: pages, actions, the live feed, sign-in.

Every read and action goes through the signed-in person's own ``CoordinatorClient``
(sessions, history, integrity, repair, destroy) or through ``sessionctl.admin`` on
their own connection (queues, dead letters), exactly as ``sessionctl`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import contracts
from contracts import (
    ErrorCode,
    EventEnvelope,
    SessionHistory,
    SessionStatus,
    Topology,
    WorkflowSession,
)
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, StoreUnavailable
from sessionctl import admin
from sessionctl.console.auth import Account, Accounts, CookieSigner
from sessionctl.console.errors import (
    BadInput,
    ConsoleError,
    CsrfRefused,
    Forbidden,
    NotFound,
    SignInFailed,
    TooManySignIns,
)
from sessionctl.console.feed import LiveFeed, Subscriber
from sessionctl.console.limits import SignInLimits, address_key
from sessionctl.console.params import (
    SessionFilters,
    parse_flag,
    parse_form,
    parse_int,
    parse_time,
    parse_uuid,
)
from transport.amqp import AmqpTransport
from transport.port import AccessRefused, Delivery, Transport, TransportError

__all__ = ["ConsoleSettings", "create_app"]

log = logging.getLogger("sessionbus.console")

HERE = Path(__file__).resolve().parent
COOKIE = "sessionbus_console"
LOGIN_COOKIE = "sessionbus_console_login"
# Dead letters shown on one page (the rest are counted).
DEAD_LETTERS_SHOWN = 500
# A body shown in full up to this size; larger ones are cut.
BODY_SHOWN = 64 * 1024
# The live stream's comment line when nothing happens, so proxies keep it open.
KEEPALIVE_SECONDS = 15.0
# After an event, how long a live stream waits for more to send in one write: 20 writes
# a second at most, however many events (1,000/s costs one write each otherwise).
FEED_GATHER_SECONDS = 0.05


@dataclass
class ConsoleSettings:
    """What a console serves and how.

    ``amqp_url``: the broker; people sign in with their own user on it. ``feed_url``:
    the connection of the console's own live feed (default: ``amqp_url`` as given);
    ``feed_transport`` instead shares a running transport (the coordinator's console).
    ``secret`` signs cookies (a random one per process unless given: sign-ins then end
    with the process). ``idle_timeout``: seconds before an idle sign-in is closed.
    ``sign_in_limits``: how many failed sign-ins per user and per client address before
    further ones are refused (429) without asking the broker, and for how long."""

    amqp_url: str
    topology: Topology = field(default_factory=Topology)
    management_url: str | None = None
    prometheus_url: str | None = None
    secret: bytes | None = None
    idle_timeout: float = 3600.0
    secure_cookies: bool = False
    feed_url: str | None = None
    feed_transport: Transport | None = None
    live: bool = True
    command_timeout: float = 10.0
    sign_in_limits: SignInLimits = field(default_factory=SignInLimits)


@dataclass
class Console:
    settings: ConsoleSettings
    accounts: Accounts
    signer: CookieSigner
    feed: LiveFeed | None
    templates: Jinja2Templates
    # Set when the server stops: open live streams end (a browser would keep them
    # open, and the server would wait for them).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


# --- rendering -------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    return f"{_span(seconds)} ago" if seconds >= 0 else f"in {_span(-seconds)}"


def _span(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["span"] = _span
    env.globals["statuses"] = [s.value for s in SessionStatus]
    return templates


def render(
    request: Request,
    name: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
    account: Account | None = None,
) -> Response:
    console = _console(request)
    feed = console.feed
    values: dict[str, Any] = {
        "account": account,
        "csrf": account.csrf if account else "",
        "flashes": account.take_flashes() if account else [],
        "prefix": console.settings.topology.prefix,
        "live": feed is not None and feed.running,
        "live_problem": feed.problem if feed is not None else "live updates are off",
        "path": request.url.path,
        "now": datetime.now(UTC),
    }
    values.update(context or {})
    return console.templates.TemplateResponse(request, name, values, status_code=status)


def error_page(request: Request, status: int, title: str, message: str) -> Response:
    account = _account(request)
    return render(
        request,
        "error.html",
        {"title": title, "message": message, "status": status},
        status=status,
        account=account,
    )


# --- who is asking ---------------------------------------------------------------------


class _SignInRequired(Exception):
    """No (or an expired) sign-in: pages send the person to the sign-in form."""


def _account(request: Request) -> Account | None:
    console = _console(request)
    return console.accounts.get(console.signer.unsign(request.cookies.get(COOKIE)))


def require(request: Request) -> Account:
    account = _account(request)
    if account is None:
        raise _SignInRequired
    return account


async def read_form(request: Request, account: Account | None) -> dict[str, list[str]]:
    """The posted form, after its CSRF token is checked (``account`` None: the
    sign-in form, checked against its own cookie)."""
    form = parse_form(await request.body(), request.headers.get("content-type"))
    token = (form.get("csrf") or [""])[-1]
    if account is not None:
        expected = account.csrf
    else:
        expected = _console(request).signer.unsign(request.cookies.get(LOGIN_COOKIE)) or ""
    if not expected or not secrets.compare_digest(token.encode(), expected.encode()):
        raise CsrfRefused(
            "the form's token is missing or not this sign-in's (reload the page and try "
            "again); nothing was done"
        )
    return form


def _field(form: Mapping[str, list[str]], name: str) -> str:
    values = form.get(name) or [""]
    return values[-1]


def _local_path(value: str | None) -> str:
    """Where to go after signing in: a path of this console only."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/sessions"


def _no_parameters(request: Request, *allowed: str) -> None:
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        raise BadInput(f"unknown parameter(s): {', '.join(unknown)}")


# --- sign-in ---------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    console = _console(request)
    token = secrets.token_urlsafe(24)
    next_path = _local_path(request.query_params.get("next"))
    response = render(
        request, "login.html", {"login_token": token, "next": next_path, "error": None}
    )
    _set_cookie(response, console, LOGIN_COOKIE, console.signer.sign(token), max_age=3600)
    return response


async def login(request: Request) -> Response:
    console = _console(request)
    form = await read_form(request, None)
    user = _field(form, "user").strip()
    password = _field(form, "password")
    next_path = _local_path(_field(form, "next"))
    if not user or not password:
        raise BadInput("user and password are both required")
    if len(user) > 255 or len(password) > 1024:
        raise BadInput("user or password too long")
    # The peer of the connection: the console trusts no forwarded-for header (uvicorn
    # runs with proxy_headers off), which anyone could set to a fresh address each try.
    address = address_key(request.client.host if request.client else None)
    try:
        account = await console.accounts.sign_in(user, password, address)
    except SignInFailed as exc:
        token = secrets.token_urlsafe(24)
        message = str(exc)
        message = message[0].upper() + message[1:] + "."
        response = render(
            request,
            "login.html",
            {"login_token": token, "next": next_path, "error": message, "user": user},
            status=exc.status,
        )
        if isinstance(exc, TooManySignIns):
            response.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        _set_cookie(response, console, LOGIN_COOKIE, console.signer.sign(token), max_age=3600)
        return response
    response = RedirectResponse(next_path, status_code=303)
    _set_cookie(response, console, COOKIE, console.signer.sign(account.key))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


async def logout(request: Request) -> Response:
    console = _console(request)
    account = _account(request)
    if account is not None:
        await read_form(request, account)
        await console.accounts.sign_out(account.key)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def _set_cookie(
    response: Response, console: Console, name: str, value: str, max_age: int | None = None
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=console.settings.secure_cookies,
    )


# --- sessions --------------------------------------------------------------------------


async def home(request: Request) -> Response:
    return RedirectResponse("/sessions", status_code=303)


async def sessions_list(request: Request) -> Response:
    account = require(request)
    filters = SessionFilters.from_query(request.query_params)
    client = account.client
    now = datetime.now(UTC)
    # The questions at once: a page waits for the slowest, not for each in turn.
    page, modules, destroyed = await asyncio.gather(
        client.page_workflow_sessions(
            status=filters.status,
            module_id=filters.module,
            limit=filters.limit,
            after=filters.after,
            created_from=filters.created_from,
            created_to=filters.created_to,
            has_errors=filters.errors,
            idle_since=filters.idle_since(now),
            match_id=filters.q,
            newest_first=filters.order == "newest",
        ),
        client.list_modules(),
        _destroyed(client, filters.q if filters.after is None else None),
    )
    sessions = list(page.sessions)
    # Destroyed sessions are not in the live listing: the first page of a search also
    # shows those with this id or that had a module session with it (marked destroyed).
    listed = {s.session_id for s in sessions}
    sessions += [s for s in destroyed if s.session_id not in listed]
    return render(
        request,
        "sessions.html",
        {
            "filters": filters,
            "sessions": sessions,
            "modules": [m.module_id for m in modules],
            "next_url": f"/sessions?{filters.query(after=page.next_after)}"
            if page.next_after is not None
            else None,
            "first_url": f"/sessions?{filters.query()}" if filters.after is not None else None,
            "position": page.position,
        },
        account=account,
    )


async def _destroyed(
    client: CoordinatorClient, match_id: uuid.UUID | None
) -> list[WorkflowSession]:
    """Destroyed sessions whose id is ``match_id`` or that had a module session with it."""
    if match_id is None:
        return []
    try:
        found = await client.find_workflow_sessions(match_id)
    except CommandFailed as exc:
        if exc.error.code is not ErrorCode.INVALID_MESSAGE:
            raise
        # A coordinator that predates the query: a destroyed one by its own id only.
        session = await client.get_workflow_session(match_id)
        found = [session] if session is not None else []
    return [s for s in found if s.destroyed]


def _sse(
    subscriber: Subscriber, got: tuple[str, dict[str, Any]], only: uuid.UUID | None
) -> list[str]:
    """The server-sent events for one item of a page's stream, after what the stream
    has to say first (a resync that found the stream full, summaries it missed)."""
    out: list[str] = []
    if subscriber.resync is not None:
        out.append(f"event: resync\ndata: {json.dumps(subscriber.resync)}\n\n")
        subscriber.resync = None
    if subscriber.missed:
        out.append(f"event: missed\ndata: {subscriber.missed}\n\n")
        subscriber.missed = 0
    kind, item = got
    if kind == "resync":
        out.append(f"event: resync\ndata: {json.dumps(item)}\n\n")
    elif only is None or item["session_id"] == str(only):
        out.append(f"event: session\ndata: {json.dumps(item)}\n\n")
    return out


async def sessions_feed(request: Request) -> Response:
    """Server-sent events: one ``session`` event per session event published (of one
    session with ``?session=ID``), ``resync`` when the feed's broker connection was
    lost and restored (events may be missing: the page reads its view again). 204 when
    the console has no live feed."""
    account = require(request)
    _no_parameters(request, "session")
    only = parse_uuid(request.query_params.get("session"), "session")
    console = _console(request)
    feed = console.feed
    if feed is None or not feed.running:
        return Response(status_code=204)

    try:
        # Follow the events now (no page may have watched for a while): a broker that
        # cannot be reached is a 503 here, not a stream that breaks after its head.
        await feed.follow()
    except (TransportError, OSError) as exc:
        log.warning("console: live updates unavailable: %s", exc)
        return Response(f"live updates are unavailable: {exc}", status_code=503)

    async def stream() -> AsyncIterator[str]:
        async with feed.subscribe() as subscriber:
            yield "retry: 3000\n\n"
            yield f"event: ready\ndata: {json.dumps({'queue': feed.queue_name})}\n\n"
            stopping = asyncio.ensure_future(console.stopping.wait())
            getting: asyncio.Future[tuple[str, dict[str, Any]]] | None = None
            try:
                # An open page does not keep its sign-in from expiring: it ends with it.
                while console.accounts.peek(account.key) is account:
                    if subscriber.queue.empty():
                        getting = asyncio.ensure_future(subscriber.queue.get())
                        await asyncio.wait(
                            {getting, stopping},
                            timeout=KEEPALIVE_SECONDS,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        if not getting.done():
                            getting.cancel()
                            if stopping.done():
                                return
                            yield ": keep-alive\n\n"
                            continue
                        # What else arrives within a moment goes in the same write: a
                        # person sees no difference, the server writes once, not per event.
                        await asyncio.sleep(FEED_GATHER_SECONDS)
                        chunk = _sse(subscriber, getting.result(), only)
                    else:
                        chunk = []
                    while not subscriber.queue.empty():
                        chunk += _sse(subscriber, subscriber.queue.get_nowait(), only)
                    if chunk:
                        yield "".join(chunk)
            finally:
                stopping.cancel()
                if getting is not None:
                    getting.cancel()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@dataclass
class TimelineRow:
    env: EventEnvelope
    since_previous: float | None
    detail: str
    error: bool
    included: bool
    broken: bool


def _is_error(env: EventEnvelope) -> bool:
    event = env.event
    if isinstance(event, contracts.ErrorReported):
        return True
    if isinstance(event, contracts.StatusChanged):
        return event.error is not None or event.new_status is SessionStatus.FAILED
    if isinstance(event, contracts.Destroyed):
        return bool(event.orphaned)
    return False


def describe(env: EventEnvelope) -> str:
    """One line on what an event says."""
    event = env.event
    match event:
        case contracts.SessionCreated():
            steps = ", ".join(event.steps) or "no steps"
            required = ", ".join(event.required_modules) or "none"
            return f"steps: {steps}; required modules: {required}"
        case contracts.StatusChanged():
            who = f"{event.module_id}: " if event.module_id else ""
            text = f"{who}{event.old_status.value} → {event.new_status.value}"
            if event.reason:
                text += f" ({event.reason})"
            if event.error is not None:
                text += f" [{event.error.code}: {event.error.message}]"
            return text
        case contracts.Linked():
            return f"{event.module_id} linked module session {event.module_session_id}"
        case contracts.Unlinked():
            text = f"{event.module_id} unlinked module session {event.module_session_id}"
            return text + (f" ({event.reason})" if event.reason else "")
        case contracts.ActivityRecorded():
            return f"activity of {event.module_id or 'the workflow session'}"
        case contracts.ErrorReported():
            who = f"{event.module_id}: " if event.module_id else ""
            return f"{who}{event.error.code}: {event.error.message}"
        case contracts.Destroyed():
            text = f"destroyed ({event.reason})" if event.reason else "destroyed"
            if event.orphaned:
                orphans = ", ".join(f"{m} {s}" for m, s in sorted(event.orphaned.items()))
                text += f"; orphaned: {orphans}"
            return text
    data = msgspec.to_builtins(event)
    data.pop("type", None)
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, {}, []))


def timeline(
    history: SessionHistory, point: SessionHistory | None, first_bad: int | None
) -> list[TimelineRow]:
    last = point.events[-1].version if point is not None and point.events else 0
    rows: list[TimelineRow] = []
    previous: datetime | None = None
    for env in history.events:
        rows.append(
            TimelineRow(
                env=env,
                since_previous=(env.occurred_at - previous).total_seconds()
                if previous is not None
                else None,
                detail=describe(env),
                error=_is_error(env),
                included=point is None or env.version <= last,
                broken=first_bad is not None and env.version == first_bad,
            )
        )
        previous = env.occurred_at
    return rows


def _session_id(request: Request) -> uuid.UUID:
    sid = parse_uuid(request.path_params["session_id"], "session id")
    assert sid is not None
    return sid


async def session_page(request: Request) -> Response:
    account = require(request)
    sid = _session_id(request)
    query = request.query_params
    _no_parameters(request, "version", "as_of")
    version = parse_int(query.get("version"), "version", 1, 2**31)
    as_of = parse_time(query.get("as_of"), "as_of")
    client = account.client
    # The three questions at once (the history and the integrity check each read the
    # store): the page waits for the slowest, not for the three in turn.
    session, history, checked = await asyncio.gather(
        client.get_workflow_session(sid),
        client.get_session_history(sid),
        client.validate_session_integrity(sid),
        return_exceptions=True,
    )
    if isinstance(session, BaseException):
        raise session
    if isinstance(history, BaseException):
        if (
            isinstance(history, CommandFailed)
            and history.error.code == ErrorCode.UNKNOWN_SESSION
            and session is None
        ):
            raise NotFound(f"no workflow session {sid}") from history
        raise history
    if isinstance(checked, BaseException):
        raise checked
    full, report = history, checked
    verdict = contracts.verify_chain(full.events)
    point = (
        admin.history_as_of(full, version=version, as_of=as_of)
        if version is not None or as_of is not None
        else None
    )
    current = session if session is not None else full.state
    return render(
        request,
        "session.html",
        {
            "sid": sid,
            "session": current,
            "missing": [m for m in current.required_modules if m not in current.modules]
            if current is not None
            else [],
            "rows": timeline(full, point, verdict.first_bad_version),
            "verdict": verdict,
            "report": report,
            "point": point,
            "version": version,
            "as_of": as_of,
        },
        account=account,
    )


def _confirmed(form: Mapping[str, list[str]]) -> bool:
    return parse_flag(_field(form, "confirm"), "confirm")


async def session_destroy(request: Request) -> Response:
    account = require(request)
    sid = _session_id(request)
    form = await read_form(request, account)
    if not _confirmed(form):
        return render(
            request,
            "confirm.html",
            {
                "title": f"Destroy session {sid}?",
                "what": "The session goes to CLEANUP: every linked module destroys its "
                "session and unlinks, then the session is destroyed. This cannot be undone.",
                "action": f"/sessions/{sid}/destroy",
                "fields": [],
                "button": "Destroy the session",
                "back": f"/sessions/{sid}",
            },
            account=account,
        )
    await account.client.destroy_workflow_session(
        sid, f"destroyed from the console by {account.user}"
    )
    account.flash("ok", f"Cleanup of {sid} started.")
    return RedirectResponse(f"/sessions/{sid}", status_code=303)


async def session_repair(request: Request) -> Response:
    account = require(request)
    sid = _session_id(request)
    await read_form(request, account)
    result = await account.client.repair_session_integrity(sid)
    for line in result.actions or ["nothing to repair"]:
        account.flash("ok", f"Repair: {line}")
    verdict = "valid" if result.report.is_valid else "still not valid"
    account.flash("ok" if result.report.is_valid else "error", f"Integrity now: {verdict}.")
    return RedirectResponse(f"/sessions/{sid}", status_code=303)


# --- modules, queues, overview ---------------------------------------------------------


async def modules_page(request: Request) -> Response:
    account = require(request)
    _no_parameters(request)
    modules = await account.client.list_modules()
    return render(request, "modules.html", {"modules": modules}, account=account)


async def queues_page(request: Request) -> Response:
    account = require(request)
    _no_parameters(request)
    console = _console(request)
    try:
        module_ids = [m.module_id for m in await account.client.list_modules()]
    except (CoordinatorUnavailable, CommandFailed):
        module_ids = []
    queues = await admin.list_queues(
        account.transport,
        console.settings.topology,
        account.url,
        console.settings.management_url,
        module_ids,
        prometheus_url=console.settings.prometheus_url,
    )
    audit_error: str | None = None
    try:
        audit = await admin.audit_stream_span(account.transport, console.settings.topology)
    except AccessRefused:
        raise
    except TransportError as exc:
        # The queue figures are still worth the page: it says the stream was not read.
        log.warning("audit stream not read for the queues page: %s", exc)
        audit, audit_error = admin.StreamSpan(), str(exc)
    return render(
        request,
        "queues.html",
        {
            "queues": queues,
            "audit": audit,
            "audit_error": audit_error,
            "audit_stream": console.settings.topology.audit_stream,
            "management": console.settings.management_url is not None,
            "prometheus": console.settings.prometheus_url is not None,
            "passive_only": bool(queues) and all(q.source == "passive declare" for q in queues),
        },
        account=account,
    )


def _figures(health: contracts.CoordinatorHealth) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(),
        "store_position": health.store_position,
        "published_position": health.published_position,
        "relay_lag": max(0, health.store_position - health.published_position),
        "commands_handled": health.commands_handled,
        "sessions_total": health.total_workflow_sessions,
        "sessions_active": health.active_workflow_sessions,
        "sessions_by_status": {str(k): v for k, v in health.sessions_by_status.items()},
        "modules": dict(health.module_health_status),
    }


async def overview_page(request: Request) -> Response:
    account = require(request)
    _no_parameters(request)
    health = await account.client.get_coordinator_health()
    figures = _figures(health)
    by_status = [(s.value, health.sessions_by_status.get(s, 0)) for s in SessionStatus]
    return render(
        request,
        "overview.html",
        {
            "health": health,
            "figures": figures,
            "by_status": by_status,
            "most": max([n for _, n in by_status] + [1]),
        },
        account=account,
    )


async def overview_figures(request: Request) -> Response:
    account = require(request)
    _no_parameters(request)
    health = await account.client.get_coordinator_health()
    return JSONResponse(_figures(health), headers={"Cache-Control": "no-store"})


# --- dead letters ----------------------------------------------------------------------


@dataclass
class LetterView:
    letter: admin.DeadLetter
    body: str
    body_kind: str  # "json", "msgpack (as JSON)", "text", "bytes (hex)"
    cut: bool


@dataclass
class LetterGroup:
    rejected_by: str
    code: str
    reason: str
    letters: list[LetterView]

    @property
    def key(self) -> str:
        return f"{self.rejected_by}|{self.code}|{self.reason}"


def decode_body(body: bytes, content_type: str | None) -> tuple[str, str, bool]:
    """The body as a person reads it: (text, how it was read, whether it was cut)."""
    cut = len(body) > BODY_SHOWN
    shown = body[:BODY_SHOWN]
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not cut:
        try:
            if kind in {"application/msgpack", "application/x-msgpack"}:
                value = msgspec.msgpack.decode(body)
                text = json.dumps(msgspec.to_builtins(value), indent=2, default=str)
                return text, "msgpack, shown as JSON", False
            value = json.loads(body)
            return json.dumps(value, indent=2, ensure_ascii=False), "JSON", False
        except (ValueError, msgspec.DecodeError, TypeError):
            pass
    try:
        return shown.decode("utf-8"), "text", cut
    except UnicodeDecodeError:
        rows = [shown[i : i + 16].hex(" ") for i in range(0, min(len(shown), 4096), 16)]
        return "\n".join(rows), "bytes (hex; undecodable)", cut or len(shown) > 4096


def _letter_view(delivery: Delivery) -> LetterView:
    letter = admin.dead_letter(delivery)
    body, kind, cut = decode_body(delivery.body, delivery.content_type)
    return LetterView(letter=letter, body=body, body_kind=kind, cut=cut)


async def dead_letters_page(request: Request) -> Response:
    account = require(request)
    _no_parameters(request)
    topology = _console(request).settings.topology
    deliveries = await admin.unsettled_dead_letters(account.transport, topology)
    views = [_letter_view(d) for d in deliveries[:DEAD_LETTERS_SHOWN]]
    groups: dict[tuple[str, str, str], list[LetterView]] = {}
    for view in views:
        letter = view.letter
        key = (letter.rejected_by or "broker", letter.code or "-", letter.reason or "-")
        groups.setdefault(key, []).append(view)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return render(
        request,
        "dead_letters.html",
        {
            "groups": [LetterGroup(k[0], k[1], k[2], v) for k, v in ordered],
            "total": len(deliveries),
            "shown": len(views),
        },
        account=account,
    )


async def require_operator(account: Account) -> None:
    """Replaying and discarding dead letters touch every module's traffic: the
    coordinator must take this user for an operator (``user=*`` in its identity map)."""
    identity = await account.client.get_identity()
    if identity.read_only or identity.modules is not None:
        may = (
            "may only read"
            if identity.read_only
            else f"acts for {', '.join(identity.modules or [])}"
        )
        raise Forbidden(
            f"the coordinator's identity rules: {identity.user!r} {may}; replaying and "
            "discarding dead letters is for operators (user=* in SESSIONBUS_IDENTITY). "
            "Nothing was done."
        )


def _selection(form: Mapping[str, list[str]]) -> tuple[set[int] | None, bool]:
    """(offsets, every): the letters a replay or discard form names."""
    every = parse_flag(_field(form, "all"), "all")
    offsets: set[int] = set()
    for text in form.get("offset", []):
        value = parse_int(text, "offset", 0, 2**63 - 1)
        if value is not None:
            offsets.add(value)
    if every == bool(offsets):
        raise BadInput("choose the dead letters: offset=N (one or more) or all=1, not both")
    return (None if every else offsets), every


async def dead_letters_replay(request: Request) -> Response:
    account = require(request)
    form = await read_form(request, account)
    offsets, _ = _selection(form)
    await require_operator(account)
    topology = _console(request).settings.topology
    replayed, left = await admin.replay_dead_letters(account.transport, topology, offsets=offsets)
    account.flash(
        "ok" if replayed else "error", f"Replayed {replayed} dead letter(s); {left} left."
    )
    return RedirectResponse("/dead-letters", status_code=303)


async def dead_letters_discard(request: Request) -> Response:
    account = require(request)
    form = await read_form(request, account)
    offsets, every = _selection(form)
    await require_operator(account)
    if not _confirmed(form):
        what = "every dead letter" if every else f"{len(offsets or ())} dead letter(s)"
        fields = [("all", "1")] if every else [("offset", str(o)) for o in sorted(offsets or ())]
        return render(
            request,
            "confirm.html",
            {
                "title": f"Discard {what}?",
                "what": "Discarded letters are marked settled and never sent anywhere. "
                "This cannot be undone.",
                "action": "/dead-letters/discard",
                "fields": fields,
                "button": "Discard",
                "back": "/dead-letters",
            },
            account=account,
        )
    topology = _console(request).settings.topology
    discarded, left = await admin.discard_dead_letters(account.transport, topology, offsets=offsets)
    account.flash(
        "ok" if discarded else "error", f"Discarded {discarded} dead letter(s); {left} left."
    )
    return RedirectResponse("/dead-letters", status_code=303)


# --- errors ----------------------------------------------------------------------------


async def _on_sign_in_required(request: Request, exc: Exception) -> Response:
    if request.method == "GET" and request.url.path != "/sessions/feed":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urllib.parse.urlencode({'next': target})}", 303)
    return error_page(request, 401, "Sign in first", "This needs a sign-in; nothing was done.")


async def _on_console_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleError)
    return error_page(request, exc.status, exc.title, str(exc))


_STATUS_OF_CODE = {
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.INVALID_ID: 400,
}


async def _on_command_failed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CommandFailed)
    status = _STATUS_OF_CODE.get(exc.error.code, 409)
    title = "Refused by the coordinator" if status == 403 else "The coordinator said no"
    return error_page(request, status, title, f"{exc.error.code}: {exc.error.message}")


async def _on_unavailable(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StoreUnavailable):
        message = f"The coordinator's event store is unavailable; try again. ({exc})"
    else:
        message = (
            "No coordinator answered on prefix "
            f"{_console(request).settings.topology.prefix!r} in time ({exc})."
        )
    return error_page(request, 503, "Coordinator unavailable", message)


async def _on_transport_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, AccessRefused):
        return error_page(
            request, 403, "Refused by the broker", f"{exc}; nothing was done by this request."
        )
    return error_page(request, 503, "Broker unavailable", str(exc))


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {404: "Not found", 405: "Method not allowed"}
    return error_page(
        request, exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail)
    )


async def _on_anything(request: Request, exc: Exception) -> Response:
    log.exception("console: %s %s failed", request.method, request.url.path)
    return error_page(
        request,
        500,
        "Something went wrong",
        f"The console failed to answer ({type(exc).__name__}); the details are in its log.",
    )


class SecurityHeaders:
    """Every response: no framing, no sniffing, scripts and styles from here only; and
    ``Server-Timing: app;dur=MS``, the time from the request's arrival to the
    response's head (the page rendered, the coordinator's answers included): what a
    page costs the server, apart from the network and the browser."""

    HEADERS = (
        (
            b"content-security-policy",
            (
                b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
            ),
        ),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        arrived = time.perf_counter()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - arrived) * 1000
                message["headers"] = [
                    *message.get("headers", ()),
                    *self.HEADERS,
                    (b"server-timing", b"app;dur=%.1f" % took),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


# --- the application -------------------------------------------------------------------


def create_app(settings: ConsoleSettings) -> Starlette:
    """The console as an ASGI application (its lifespan opens the live feed and closes
    every sign-in's connection)."""
    accounts = Accounts(
        settings.amqp_url,
        settings.topology,
        idle_timeout=settings.idle_timeout,
        command_timeout=settings.command_timeout,
        limits=settings.sign_in_limits,
    )
    feed: LiveFeed | None = None
    if settings.live:
        if settings.feed_transport is not None:
            feed = LiveFeed(settings.feed_transport, settings.topology, own_transport=False)
        else:
            transport = AmqpTransport(
                settings.feed_url or settings.amqp_url, connection_name="sessionbus-console feed"
            )
            feed = LiveFeed(transport, settings.topology, own_transport=True)
    console = Console(
        settings=settings,
        accounts=accounts,
        signer=CookieSigner(settings.secret or secrets.token_bytes(32)),
        feed=feed,
        templates=_templates(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if feed is not None:
            await feed.start()
        try:
            yield
        finally:
            if feed is not None:
                await feed.close()
            await accounts.close()

    routes = [
        Route("/", home),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/sessions", sessions_list),
        Route("/sessions/feed", sessions_feed),
        Route("/sessions/{session_id}", session_page),
        Route("/sessions/{session_id}/destroy", session_destroy, methods=["POST"]),
        Route("/sessions/{session_id}/repair", session_repair, methods=["POST"]),
        Route("/modules", modules_page),
        Route("/queues", queues_page),
        Route("/overview", overview_page),
        Route("/overview/figures", overview_figures),
        Route("/dead-letters", dead_letters_page),
        Route("/dead-letters/replay", dead_letters_replay, methods=["POST"]),
        Route("/dead-letters/discard", dead_letters_discard, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        _SignInRequired: _on_sign_in_required,
        ConsoleError: _on_console_error,
        CommandFailed: _on_command_failed,
        CoordinatorUnavailable: _on_unavailable,
        TransportError: _on_transport_error,
        HTTPException: _on_http,
        Exception: _on_anything,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.console = console
    app.add_middleware(SecurityHeaders)
    return app
