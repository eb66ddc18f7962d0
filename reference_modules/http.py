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

import uuid
from typing import Any, Final

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from contracts import ErrorCode, SessionStatus, StandardError, WorkflowConfig
from contracts.errors import field_path
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable

__all__ = ["ExecuteStepsRequest", "FrontendApp"]

_MAX_BODY: Final = 1 << 20
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


def _json(payload: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(payload), status, media_type="application/json")


class FrontendApp:
    """ASGI application; serve it with any ASGI server (``uvicorn``). Routing, requests
    and lifespan are Starlette's; every answer, error or not, is a JSON body."""

    def __init__(self, client: CoordinatorClient) -> None:
        self.client = client
        self._decoder = msgspec.json.Decoder(ExecuteStepsRequest)
        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/sessions", self._list, methods=["GET"]),
            Route("/sessions", self._execute_steps, methods=["POST"]),
            Route("/sessions/{id}", self._get, methods=["GET"]),
            Route("/sessions/{id}/status", self._status, methods=["GET"]),
            Route("/sessions/{id}/history", self._history, methods=["GET"]),
            Route("/sessions/{id}/integrity", self._integrity, methods=["GET"]),
            Route("/sessions/{id}/destroy", self._destroy, methods=["POST"]),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={
                _HttpError: _on_http_error,
                CommandFailed: _on_command_failed,
                CoordinatorUnavailable: _on_unavailable,
                404: _on_no_route,
                405: _on_no_route,
            },
        )
        # Paths are matched with a trailing slash stripped (below), not redirected.
        self.app.router.redirect_slashes = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"].rstrip("/") or "/"
            if path != scope["path"]:
                scope = dict(scope, path=path)
        await self.app(scope, receive, send)

    async def _health(self, _request: Request) -> Response:
        return _json(await self.client.get_coordinator_health())

    async def _list(self, request: Request) -> Response:
        status = _status_param(_first(request, "status"))
        ids = await self.client.list_active_workflow_sessions(status, _first(request, "module"))
        return _json({"session_ids": ids})

    async def _execute_steps(self, request: Request) -> Response:
        steps = await self._read(request)
        session = await self.client.create_workflow_session(steps.steps, steps.config)
        return _json(
            {"session_id": session.session_id, "status": session.status, "session": session},
            201,
        )

    async def _get(self, request: Request) -> Response:
        return _json(await self._session(_session_id(request)))

    async def _status(self, request: Request) -> Response:
        sid = _session_id(request)
        session = await self._session(sid)
        return _json(
            {
                "session_id": sid,
                "status": session.status,
                "modules": {m: i.status for m, i in session.modules.items()},
            }
        )

    async def _history(self, request: Request) -> Response:
        return _json(await self.client.get_session_history(_session_id(request)))

    async def _integrity(self, request: Request) -> Response:
        return _json(await self.client.validate_session_integrity(_session_id(request)))

    async def _destroy(self, request: Request) -> Response:
        sid = _session_id(request)
        await self.client.destroy_workflow_session(sid, "destroyed through frontend-api")
        return _json({"session_id": sid, "cleanup": True}, 202)

    async def _session(self, sid: uuid.UUID) -> Any:
        session = await self.client.get_workflow_session(sid)
        if session is None:
            raise _HttpError(
                404,
                StandardError(code=ErrorCode.UNKNOWN_SESSION, message=f"no workflow session {sid}"),
            )
        return session

    async def _read(self, request: Request) -> ExecuteStepsRequest:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > _MAX_BODY:
                raise _HttpError(
                    413,
                    StandardError(
                        code=ErrorCode.MESSAGE_TOO_LARGE, message=f"body over {_MAX_BODY} bytes"
                    ),
                )
            chunks.append(chunk)
        try:
            return self._decoder.decode(b"".join(chunks))
        except msgspec.ValidationError as exc:
            raise _bad(str(exc), field_path(str(exc))) from exc
        except msgspec.DecodeError as exc:
            raise _bad(f"malformed JSON body: {exc}") from exc


async def _on_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _HttpError)
    return _json(exc.error, exc.status)


async def _on_command_failed(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CommandFailed)
    return _json(exc.error, _STATUS_FOR.get(exc.error.code, 422))


async def _on_unavailable(_request: Request, exc: Exception) -> Response:
    error = StandardError(code=ErrorCode.UNAVAILABLE, message=str(exc), retryable=True)
    return _json(error, 503)


async def _on_no_route(request: Request, _exc: Exception) -> Response:
    """No route, or not with this method (Starlette's 404 and 405): a 404 naming both."""
    method, path = request.method, request.scope["path"]
    error = StandardError(code=ErrorCode.INVALID_MESSAGE, message=f"no route {method} {path}")
    return _json(error, 404)


def _first(request: Request, name: str) -> str | None:
    """A query parameter's first non-empty value."""
    return next((v for v in request.query_params.getlist(name) if v), None)


def _session_id(request: Request) -> uuid.UUID:
    text: str = request.path_params["id"]
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _HttpError(
            400,
            StandardError(
                code=ErrorCode.INVALID_ID, message=f"{text!r} is not a UUID", field="session_id"
            ),
        ) from None


def _status_param(value: str | None) -> SessionStatus | None:
    if value is None:
        return None
    try:
        return SessionStatus(value)
    except ValueError:
        raise _bad(f"unknown status {value!r}", "status") from None
