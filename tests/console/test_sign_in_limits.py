"""The limit on failed sign-ins: counted per user and per client address, answered 429
with ``Retry-After`` and words on the sign-in page, the broker not asked while limited,
a growing but bounded wait, reset by a success, and bounded memory.

The HTTP tests run a console of their own against the real broker, with a clock the
test moves (no sleeping); each client comes from its own loopback address
(127.0.0.N), so "many addresses" are real TCP peers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from contracts import Topology
from sessionctl.console import ConsoleServer, ConsoleSettings, auth
from sessionctl.console.errors import TooManySignIns
from sessionctl.console.limits import SignInLimiter, SignInLimits, address_key, in_words
from tests.bus.conftest import BrokerUsers
from tests.console.conftest import csrf_of
from transport.amqp import AmqpTransport

WRONG = "not-the-password-4711"


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Limited:
    server: ConsoleServer
    clock: Clock
    connects: list[str]
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def limiter(self) -> SignInLimiter:
        limiter: SignInLimiter = self.server.app.state.console.accounts.limiter
        return limiter

    def http(self, address: int) -> httpx.AsyncClient:
        """A client whose connections come from 127.0.0.``address``."""
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{address}")
        client = httpx.AsyncClient(base_url=self.server.url, transport=transport, timeout=30)
        self.clients.append(client)
        return client

    async def sign_in(self, address: int, user: str, password: str = WRONG) -> httpx.Response:
        http = self.http(address)
        token = csrf_of((await http.get("/login")).text)
        return await http.post("/login", data={"user": user, "password": password, "csrf": token})


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The broker connections the console opens to sign someone in, by user."""
    opened: list[str] = []

    class Counting(AmqpTransport):
        async def connect(self) -> None:
            opened.append(self.connection_name)
            await super().connect()

    monkeypatch.setattr(auth, "AmqpTransport", Counting)
    return opened


async def _limited(
    amqp_url: str, prefix: str, connects: list[str], limits: SignInLimits, clock: Clock
) -> AsyncIterator[Limited]:
    settings = ConsoleSettings(
        amqp_url=amqp_url,
        # No coordinator on this prefix: a sign-in asks it who the user is only briefly.
        topology=Topology(prefix),
        command_timeout=0.5,
        live=False,
        sign_in_limits=limits,
    )
    async with ConsoleServer(settings) as server:
        limited = Limited(server, clock, connects)
        try:
            yield limited
        finally:
            for client in limited.clients:
                await client.aclose()


@pytest.fixture
async def limited(
    amqp_url: str, prefix: str, connects: list[str], users: BrokerUsers
) -> AsyncIterator[Limited]:
    """A console with the default limits (5 failures in 5 minutes, then 1 minute)."""
    clock = Clock()
    async for limited in _limited(amqp_url, prefix, connects, SignInLimits(clock=clock), clock):
        yield limited


def _tried(connects: list[str], user: str) -> int:
    return connects.count(f"sessionbus-console {user}")


def _says_when(answer: httpx.Response, words: str, seconds: int) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.headers["retry-after"] == str(seconds)
    assert f"try again in {words}" in answer.text
    assert 'id="login-error"' in answer.text
    assert 'id="login-form"' in answer.text  # the form is there for the next try
    assert WRONG not in answer.text
    assert "Traceback" not in answer.text


async def test_one_user_guessed_from_many_addresses_is_limited(
    limited: Limited, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"{prefix}-victim"
    caplog.set_level(logging.WARNING, "sessionbus.console.auth")
    for address in range(2, 7):
        assert (await limited.sign_in(address, user)).status_code == 401
    assert _tried(limited.connects, user) == 5
    answer = await limited.sign_in(7, user)
    _says_when(answer, "1 minute", 60)
    assert "too many failed sign-ins for this user or from this address" in answer.text.lower()
    assert _tried(limited.connects, user) == 5, "the broker was asked while limited"
    # Someone else, from an address of its own, is not held up.
    assert (await limited.sign_in(8, f"{prefix}-other")).status_code == 401

    (line,) = [r for r in caplog.records if r.levelno == logging.WARNING and "limited" in r.msg]
    text = line.getMessage()
    assert f"user {user!r}" in text
    assert "127.0.0.6" in text
    assert WRONG not in text

    limited.clock.advance(30)
    _says_when(await limited.sign_in(9, user), "30 seconds", 30)
    limited.clock.advance(31)
    assert (await limited.sign_in(9, user)).status_code == 401
    assert _tried(limited.connects, user) == 6


async def test_many_users_guessed_from_one_address_are_limited(
    limited: Limited, prefix: str
) -> None:
    for n in range(5):
        assert (await limited.sign_in(2, f"{prefix}-guess{n}")).status_code == 401
    _says_when(await limited.sign_in(2, f"{prefix}-guess5"), "1 minute", 60)
    assert _tried(limited.connects, f"{prefix}-guess5") == 0
    # The same names from another address are not limited: their own counts are at 1.
    assert (await limited.sign_in(3, f"{prefix}-guess0")).status_code == 401
    # An IPv4 peer is its own address; one IPv6 host's /64 counts as one.
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key(None) == "unknown"


async def test_parallel_guesses_do_not_pass_the_limit(limited: Limited, prefix: str) -> None:
    user = f"{prefix}-parallel"
    answers = await asyncio.gather(*(limited.sign_in(2 + n, user) for n in range(20)))
    statuses = sorted(a.status_code for a in answers)
    assert _tried(limited.connects, user) <= 5
    assert statuses.count(401) == _tried(limited.connects, user)
    assert set(statuses) <= {401, 429}
    assert all("retry-after" in a.headers for a in answers if a.status_code == 429)


async def test_a_successful_sign_in_clears_the_users_count(
    limited: Limited, users: BrokerUsers
) -> None:
    person = users("person")
    user = person["user"]
    for address in range(2, 6):
        assert (await limited.sign_in(address, user)).status_code == 401
    assert (await limited.sign_in(6, user, person["password"])).status_code == 303
    assert limited.limiter.users.get(user) is None
    # Four more failures (from fresh addresses) are allowed again, the fifth locks.
    for address in range(7, 11):
        assert (await limited.sign_in(address, user)).status_code == 401
    assert (await limited.sign_in(11, user)).status_code == 401
    _says_when(await limited.sign_in(12, user), "1 minute", 60)


async def test_the_wait_doubles_with_each_lock_up_to_its_bound(
    amqp_url: str, prefix: str, connects: list[str]
) -> None:
    clock = Clock()
    limits = SignInLimits(failures=1, lockout=60, max_lockout=900, clock=clock)
    user = f"{prefix}-again"
    waits = [(60, "1 minute"), (120, "2 minutes"), (240, "4 minutes"), (480, "8 minutes")]
    waits += [(900, "15 minutes"), (900, "15 minutes")]
    async for console in _limited(amqp_url, prefix, connects, limits, clock):
        for n, (wait, words) in enumerate(waits):
            # Each try from addresses of its own: only the user's count is at work.
            assert (await console.sign_in(2 + 2 * n, user)).status_code == 401
            _says_when(await console.sign_in(3 + 2 * n, user), words, wait)
            clock.advance(wait)
        assert _tried(connects, user) == 6


def test_the_limiter_forgets_old_keys_and_caps_how_many_it_keeps() -> None:
    clock = Clock()
    limiter = SignInLimiter(SignInLimits(max_tracked=100, clock=clock))
    # A flood of distinct names from distinct addresses: at most max_tracked of each.
    for n in range(10_000):
        limiter.begin(f"user{n}", f"10.0.{n // 256}.{n % 256}")
        limiter.failed(f"user{n}", f"10.0.{n // 256}.{n % 256}")
    assert len(limiter.users.keys) == 100
    assert len(limiter.addresses.keys) == 100
    assert "user9999" in limiter.users.keys  # the newest are kept
    # Successful sign-ins leave nothing behind.
    limiter.begin("fine", "10.9.9.9")
    limiter.succeeded("fine", "10.9.9.9")
    assert limiter.users.get("fine") is None
    assert limiter.addresses.get("10.9.9.9") is None
    # An hour after their last failure, keys are forgotten (on the next attempt).
    clock.advance(3601)
    limiter.begin("late", "10.9.9.8")
    assert len(limiter) == 2


def test_a_lock_outlives_the_window_and_a_cancelled_attempt_counts_nothing() -> None:
    clock = Clock()
    limiter = SignInLimiter(SignInLimits(failures=2, window=10, lockout=60, clock=clock))
    for _ in range(2):
        limiter.begin("u", "a")
        limiter.failed("u", "a")
    clock.advance(30)  # past the window, inside the lock
    with pytest.raises(TooManySignIns) as refused:
        limiter.begin("u", "b")
    assert refused.value.retry_after == 30
    limiter.begin("v", "c")
    limiter.abandoned("v", "c")
    assert limiter.users.get("v") is None
    assert limiter.addresses.get("c") is None


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (0.2, "1 second"),
        (30, "30 seconds"),
        (59.5, "1 minute"),
        (61, "2 minutes"),
        (900, "15 minutes"),
    ],
)
def test_waits_are_said_in_words(seconds: float, words: str) -> None:
    assert in_words(seconds) == words


def test_limits_that_would_end_a_lock_early_are_refused() -> None:
    with pytest.raises(ValueError, match="forget_after"):
        SignInLimits(max_lockout=7200)
    with pytest.raises(ValueError, match="lockout"):
        SignInLimits(lockout=0)
