"""Serving the console with uvicorn inside a running event loop (``sessionctl console``
on its own, or beside a coordinator)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from sessionctl.console.app import ConsoleSettings, create_app

__all__ = ["ConsoleServer"]


class _Server(uvicorn.Server):
    # The process's own signal handling (the coordinator's, sessionctl's) stays in
    # charge: this server stops when told to, not on SIGINT by itself.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ConsoleServer:
    """The console on ``host:port`` (port 0: a free one; ``port`` then tells which)."""

    def __init__(self, settings: ConsoleSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = create_app(settings)
        self.host = host
        self._socket = socket.create_server((host, port), reuse_port=False)
        # asyncio turns Nagle off only on sockets whose proto is IPPROTO_TCP, and this
        # one's is 0: with Nagle on, a response's body waited for the client's delayed
        # ACK of its head, 40 ms on every request but a connection's first. Accepted
        # connections inherit the option.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            proxy_headers=False,
            # Whatever still runs after this long is cancelled: stopping never hangs.
            timeout_graceful_shutdown=5,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    def connections(self) -> list[socket.socket]:
        """The sockets of the connections open now (to check how they are set up)."""
        found = []
        for protocol in self._server.server_state.connections:
            transport = getattr(protocol, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                found.append(sock)
        return found

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Serve in the background; returns once the server accepts connections."""
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._socket])
        )
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise RuntimeError("the console stopped while starting")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.app.state.console.stopping.set()
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        self._socket.close()

    async def __aenter__(self) -> ConsoleServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
