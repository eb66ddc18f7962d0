"""The frontend-api module's HTTP face: a small ASGI app over ``CoordinatorClient``.

Routes (JSON in, JSON out; errors are ``StandardError`` bodies with a matching status):

- ``GET  /health``                       coordinator health
- ``GET  /sessions``                     ids of active sessions (``?status=``, ``?module=``)
- ``POST /sessions``                     execute steps: ``{"steps": [...], "config": {...}}``
- ``GET  /sessions/{id}``                the workflow session
- ``GET  /sessions/{id}/status``         status of the session and of each module session
- ``GET  /sessions/{id}/history``        its events
- ``GET  /sessions/{id}/integrity``      its integrity report
- ``POST /sessions/{id}/destroy``        start its cleanup
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec

from contracts import ErrorCode, SessionStatus, StandardError, WorkflowConfig
from contracts.errors import field_path
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable

__all__ = ["ExecuteStepsRequest", "FrontendApp"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_MAX_BODY: Final = 1 << 20
_SESSION = re.compile(r"^/sessions/(?P<id>[^/]+)(?P<rest>/[a-z]+)?$")
_STATUS_FOR: Final[dict[ErrorCode, int]] = {
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.INVALID_ID: 400,
    ErrorCode.INVALID_TRANSITION: 409,
    ErrorCode.SESSION_EXISTS: 409,
    ErrorCode.SESSION_CLOSED: 409,
    ErrorCode.SESSION_DESTROYED: 410,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.STORE_UNAVAILABLE: 503,
}


class ExecuteStepsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The seed's ExecuteStepsRequest: the steps of a new workflow session."""

    steps: list[str]
    config: WorkflowConfig = msgspec.field(default_factory=WorkflowConfig)


class _HttpError(Exception):
    def __init__(self, status: int, error: StandardError) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error


def _bad(message: str, field: str | None = None) -> _HttpError:
    return _HttpError(
        400, StandardError(code=ErrorCode.INVALID_MESSAGE, message=message, field=field)
    )


class FrontendApp:
    """ASGI application; serve it with any ASGI server (``uvicorn``)."""

    def __init__(self, client: CoordinatorClient) -> None:
        self.client = client
        self._decoder = msgspec.json.Decoder(ExecuteStepsRequest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, payload = await self._route(scope, receive)
        except _HttpError as exc:
            status, payload = exc.status, exc.error
        except CommandFailed as exc:
            status, payload = _STATUS_FOR.get(exc.error.code, 422), exc.error
        except CoordinatorUnavailable as exc:
            status = 503
            payload = StandardError(code=ErrorCode.UNAVAILABLE, message=str(exc), retryable=True)
        body = msgspec.json.encode(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        method = scope["method"]
        path = scope["path"].rstrip("/") or "/"
        query = parse_qs(scope.get("query_string", b"").decode())
        client = self.client
        if path == "/health" and method == "GET":
            return 200, await client.get_coordinator_health()
        if path == "/sessions":
            if method == "GET":
                status = _status_param(query)
                module = query.get("module", [None])[0]
                ids = await client.list_active_workflow_sessions(status, module)
                return 200, {"session_ids": ids}
            if method == "POST":
                request = await self._read(receive)
                session = await client.create_workflow_session(request.steps, request.config)
                return 201, {
                    "session_id": session.session_id,
                    "status": session.status,
                    "session": session,
                }
        match = _SESSION.match(path)
        if match is not None:
            sid = _session_id(match["id"])
            rest = match["rest"] or ""
            if method == "GET" and rest == "":
                return 200, await self._session(sid)
            if method == "GET" and rest == "/status":
                session = await self._session(sid)
                return 200, {
                    "session_id": sid,
                    "status": session.status,
                    "modules": {m: i.status for m, i in session.modules.items()},
                }
            if method == "GET" and rest == "/history":
                return 200, await client.get_session_history(sid)
            if method == "GET" and rest == "/integrity":
                return 200, await client.validate_session_integrity(sid)
            if method == "POST" and rest == "/destroy":
                await client.destroy_workflow_session(sid, "destroyed through frontend-api")
                return 202, {"session_id": sid, "cleanup": True}
        raise _HttpError(
            404, StandardError(code=ErrorCode.INVALID_MESSAGE, message=f"no route {method} {path}")
        )

    async def _session(self, sid: uuid.UUID) -> Any:
        session = await self.client.get_workflow_session(sid)
        if session is None:
            raise _HttpError(
                404,
                StandardError(code=ErrorCode.UNKNOWN_SESSION, message=f"no workflow session {sid}"),
            )
        return session

    async def _read(self, receive: Receive) -> ExecuteStepsRequest:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_BODY:
                raise _HttpError(
                    413,
                    StandardError(
                        code=ErrorCode.MESSAGE_TOO_LARGE, message=f"body over {_MAX_BODY} bytes"
                    ),
                )
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            return self._decoder.decode(b"".join(chunks))
        except msgspec.ValidationError as exc:
            raise _bad(str(exc), field_path(str(exc))) from exc
        except msgspec.DecodeError as exc:
            raise _bad(f"malformed JSON body: {exc}") from exc


def _session_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _HttpError(
            400,
            StandardError(
                code=ErrorCode.INVALID_ID, message=f"{text!r} is not a UUID", field="session_id"
            ),
        ) from None


def _status_param(query: dict[str, list[str]]) -> SessionStatus | None:
    value = query.get("status", [None])[0]
    if value is None:
        return None
    try:
        return SessionStatus(value)
    except ValueError:
        raise _bad(f"unknown status {value!r}", "status") from None
