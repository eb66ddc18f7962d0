"""Who is signed in: one broker connection per person, kept on the server.

A person signs in with their broker user and password. The console opens a connection
to the broker as that user and keeps it here, under an opaque random id; the browser
gets only that id, signed (HMAC-SHA256 with the console's secret) in an HttpOnly
cookie. The password goes to the broker once and is not kept anywhere the console
writes (cookie, page, log); the connection itself holds the URL it reconnects with.
The coordinator then knows the person as their broker user, and its identity rules
decide what they may do; the broker's permissions decide what they may read and
publish (dead letters). A sign-in idle for ``idle_timeout`` seconds is closed, and so
is its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field

from contracts import GetIdentity, IdentityResult, Topology
from module_sdk.client import CoordinatorClient
from module_sdk.errors import CommandFailed, CoordinatorUnavailable
from sessionctl.console.errors import SignInFailed
from sessionctl.console.limits import SignInLimiter, SignInLimits
from transport.amqp import AmqpTransport, broker_addresses
from transport.port import AccessRefused, TransportError

__all__ = ["Account", "Accounts", "CookieSigner", "with_user"]

log = logging.getLogger("sessionbus.console.auth")


def with_user(amqp_url: str, user: str, password: str) -> str:
    """``amqp_url`` (one URL or a comma-separated cluster list) with these credentials."""
    out = []
    for address in broker_addresses(amqp_url):
        parts = urllib.parse.urlsplit(address)
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        netloc = (
            f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
        )
        if parts.port:
            netloc += f":{parts.port}"
        out.append(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    return ",".join(out)


async def _role(client: CoordinatorClient) -> str:
    """What the coordinator's identity rules make of this user, in words."""
    try:
        # Briefly: a sign-in with no coordinator answering still opens the console
        # (whose pages then say that no coordinator answers).
        identity = await client.call(GetIdentity(), timeout=min(client.timeout, 3.0))
    except (CommandFailed, CoordinatorUnavailable, TransportError):
        return "unknown to the coordinator"
    if not isinstance(identity, IdentityResult):
        return "unknown to the coordinator"
    if identity.read_only:
        return "read only"
    if identity.modules is None:
        return "operator"
    return "acts for " + ", ".join(identity.modules)


class CookieSigner:
    """``value.signature``: an HMAC-SHA256 of the value under the console's secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, value: str) -> str:
        return hmac.new(self._secret, value.encode(), hashlib.sha256).hexdigest()

    def sign(self, value: str) -> str:
        return f"{value}.{self._mac(value)}"

    def unsign(self, signed: str | None) -> str | None:
        """The value, or ``None`` when the cookie is missing or its signature is wrong."""
        if not signed:
            return None
        value, sep, mac = signed.rpartition(".")
        if not sep or not hmac.compare_digest(mac, self._mac(value)):
            return None
        return value


@dataclass
class Account:
    """A signed-in person: their broker user, their connection and client, the form
    token of their actions, and messages for their next page."""

    key: str
    user: str
    transport: AmqpTransport
    client: CoordinatorClient
    url: str  # the broker URL with this user's credentials (for the management API)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    role: str = "unknown to the coordinator"
    last_seen: float = field(default_factory=time.monotonic)
    flashes: list[tuple[str, str]] = field(default_factory=list)

    def flash(self, kind: str, message: str) -> None:
        """A message shown on the next page this person sees (``ok`` or ``error``)."""
        self.flashes.append((kind, message))

    def take_flashes(self) -> list[tuple[str, str]]:
        flashes, self.flashes = self.flashes, []
        return flashes

    def __repr__(self) -> str:  # never the URL: it holds the password
        return f"Account({self.user!r})"


class Accounts:
    """The signed-in people of one console process, by opaque key."""

    def __init__(
        self,
        amqp_url: str,
        topology: Topology,
        *,
        idle_timeout: float = 3600.0,
        connect_timeout: float = 10.0,
        command_timeout: float = 10.0,
        limits: SignInLimits | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.topology = topology
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._accounts: dict[str, Account] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.limiter = SignInLimiter(limits)

    def __len__(self) -> int:
        return len(self._accounts)

    async def sign_in(self, user: str, password: str, address: str = "unknown") -> Account:
        """Open a broker connection as ``user``; ``SignInFailed`` says why not
        (``TooManySignIns`` without asking the broker, when ``user`` or the client
        ``address`` has failed too often)."""
        self.limiter.begin(user, address)
        try:
            transport = await self._connect(user, password)
        except SignInFailed:
            # Counted even when the broker seemed unreachable: a broker that drops the
            # connection on a wrong password must not make guessing free.
            self.limiter.failed(user, address)
            raise
        except BaseException:
            self.limiter.abandoned(user, address)
            raise
        self.limiter.succeeded(user, address)
        url = with_user(self.amqp_url, user, password)
        client = CoordinatorClient(
            transport, self.topology, timeout=self.command_timeout, attempts=1
        )
        account = Account(
            key=secrets.token_urlsafe(32), user=user, transport=transport, client=client, url=url
        )
        account.role = await _role(client)
        self._accounts[account.key] = account
        log.info("console: %r signed in (%s)", user, account.role)
        self._start_reaper()
        return account

    async def _connect(self, user: str, password: str) -> AmqpTransport:
        transport = AmqpTransport(
            with_user(self.amqp_url, user, password),
            connection_name=f"sessionbus-console {user}",
            connect_timeout=self.connect_timeout,
        )
        try:
            await transport.connect()
        except AccessRefused as exc:
            raise SignInFailed("the broker refused this user and password") from exc
        except (TransportError, OSError) as exc:
            log.warning("console sign-in of %r: broker not reachable: %s", user, exc)
            raise SignInFailed(
                "the broker could not be reached, or refused this user and password"
            ) from exc
        return transport

    def get(self, key: str | None) -> Account | None:
        """The account for a cookie's key, if signed in and not idle too long; each
        request it answers counts as activity."""
        if key is None:
            return None
        account = self._accounts.get(key)
        if account is None:
            return None
        now = time.monotonic()
        if now - account.last_seen > self.idle_timeout:
            self._accounts.pop(key, None)
            asyncio.get_running_loop().create_task(self._close(account))
            return None
        account.last_seen = now
        return account

    def peek(self, key: str) -> Account | None:
        """The account, if still signed in; not counted as activity."""
        return self._accounts.get(key)

    async def sign_out(self, key: str | None) -> None:
        account = self._accounts.pop(key, None) if key else None
        if account is not None:
            await self._close(account)
            log.info("console: %r signed out", account.user)

    async def close(self) -> None:
        """Sign everyone out (the console stops)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        accounts, self._accounts = list(self._accounts.values()), {}
        for account in accounts:
            await self._close(account)

    @staticmethod
    async def _close(account: Account) -> None:
        with contextlib.suppress(Exception):
            await account.transport.close()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close the connections of sign-ins idle too long, even if never seen again."""
        while self._accounts:
            await asyncio.sleep(min(60.0, max(self.idle_timeout / 4, 0.05)))
            now = time.monotonic()
            for key, account in list(self._accounts.items()):
                if now - account.last_seen > self.idle_timeout:
                    self._accounts.pop(key, None)
                    await self._close(account)
                    log.info(
                        "console: %r signed out after %g s idle", account.user, self.idle_timeout
                    )
