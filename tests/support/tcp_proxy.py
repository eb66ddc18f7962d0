"""A TCP proxy on 127.0.0.1 for network faults between a client and the broker.

    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    url = proxy.url_for(amqp_url)          # clients connect through the proxy
    proxy.cut()                            # every open connection is reset
    proxy.refuse_for(2.0)                  # new connections are reset for 2 s
    proxy.latency = 0.1                    # 100 ms more each way, order kept
    proxy.blackhole()                      # open connections go silent, never reset
    await proxy.close()

Data goes through in order in each direction; with ``latency`` set, each chunk is held
back that long after it was read (a slow link, not a slow reader: reading goes on).
``cut`` aborts both sides' sockets, so the client sees a reset as on a dropped link,
and the broker sees its client vanish. ``blackhole`` is a partition instead: the open
connections stay open, nothing more goes through either way, and when one side closes
the other is not told (the proxy's own TCP stack still acknowledges, so neither side's
TCP timeouts fire: only application timeouts and server-side session limits help).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from dataclasses import dataclass, field

__all__ = ["ProxyStats", "TcpProxy"]

log = logging.getLogger("tests.tcp_proxy")

_CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    cut: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cuts: list[float] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)  # time.monotonic() of each

    def first_accept_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first connection let through after it."""
        later = [t for t in self.accepted_at if t > moment]
        return min(later) - moment if later else None


class _Link:
    """One proxied connection: client <-> upstream, two pumps."""

    def __init__(
        self,
        proxy: TcpProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_writer = client[1]
        self.upstream_writer = upstream[1]
        self.tasks = [
            asyncio.create_task(self._pump(client[0], upstream[1], up=True)),
            asyncio.create_task(self._pump(upstream[0], client[1], up=False)),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        held: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(held, writer))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self in self.proxy.silenced:
                    continue  # black-holed: swallowed
                if up:
                    self.proxy.stats.bytes_up += len(data)
                else:
                    self.proxy.stats.bytes_down += len(data)
                held.put_nowait((time.monotonic() + self.proxy.latency, data))
        except (ConnectionError, OSError):
            pass
        finally:
            held.put_nowait(None)
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await sender
            if self in self.proxy.silenced:
                # The side that ended goes; the other hears nothing of it.
                (self.client_writer if up else self.upstream_writer).transport.abort()
            else:
                self.abort()

    async def _send(
        self, held: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            item = await held.get()
            if item is None:
                return
            due, data = item
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()

    def abort(self) -> None:
        for writer in (self.client_writer, self.upstream_writer):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        self.proxy.links.discard(self)
        self.proxy.silenced.discard(self)


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listen_port = listen_port
        self.latency = 0.0
        self.links: set[_Link] = set()
        self.silenced: set[_Link] = set()  # black-holed links
        self.stats = ProxyStats()
        self._refuse_until = 0.0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @classmethod
    def for_url(cls, amqp_url: str) -> TcpProxy:
        parts = urllib.parse.urlsplit(amqp_url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5672)

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    def url_for(self, amqp_url: str) -> str:
        """``amqp_url`` pointed at the proxy."""
        parts = urllib.parse.urlsplit(amqp_url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(
            parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()
        # Cut links end their handlers; a handler cancelled instead is reported by
        # asyncio's stream callback as an error in the log.
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def refusing(self) -> bool:
        return time.monotonic() < self._refuse_until

    def refuse_for(self, seconds: float) -> None:
        """Reset every new connection for ``seconds`` (the broker looks unreachable)."""
        self._refuse_until = time.monotonic() + seconds

    def cut(self) -> int:
        """Reset every open connection; how many there were."""
        links = list(self.links)
        for link in links:
            link.abort()
        if links:
            self.stats.cut += len(links)
            self.stats.cuts.append(time.monotonic())
        return len(links)

    def blackhole(self) -> int:
        """Silence every open connection (a partition): from now on nothing goes through
        either way and neither side is reset. New connections are not affected (refuse
        them too with ``refuse_for``). ``cut`` or ``close`` ends the silenced ones."""
        self.silenced |= self.links
        return len(self.links)

    def outage(self, seconds: float) -> int:
        """Cut every connection and refuse new ones for ``seconds``."""
        self.refuse_for(seconds)
        return self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if self.refusing:
                self.stats.refused += 1
                writer.transport.abort()
                return
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
            except (OSError, TimeoutError) as exc:
                log.warning("proxy: upstream %s:%d unreachable: %s", *self.target, exc)
                writer.transport.abort()
                return
            self.stats.accepted += 1
            self.stats.accepted_at.append(time.monotonic())
            link = _Link(self, (reader, writer), upstream)
            self.links.add(link)
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._handlers.discard(task)
