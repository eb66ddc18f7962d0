"""A limit on failed sign-ins, so a password cannot be guessed at the broker's speed.

Failures are counted twice, separately: per user name (one account guessed from many
addresses) and per client address (many accounts guessed from one address; an IPv6
client counts by its /64, which one host usually holds whole). ``failures`` failures
of one key within ``window`` seconds lock that key for ``lockout`` seconds; each
further lock of the same key doubles the wait, up to ``max_lockout``. While a key is
locked, or while as many attempts as it has left are still being checked, a sign-in
for it is refused before the broker is asked. A successful sign-in forgets its user's
failures, not its address's: one good account of their own must not let someone reset
the count of the address they guess others from.

Memory stays bounded: a key is forgotten ``forget_after`` seconds after its last
failure (its doubling starts over), and each table keeps at most ``max_tracked`` keys,
dropping the one whose last failure is oldest when full.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sessionctl.console.errors import TooManySignIns

__all__ = ["SignInLimiter", "SignInLimits", "address_key", "in_words"]

log = logging.getLogger("sessionbus.console.auth")


@dataclass(frozen=True, kw_only=True)
class SignInLimits:
    """How many failed sign-ins are allowed and how long a limited key waits.

    ``clock`` gives monotonic seconds (tests pass their own, so they need not sleep)."""

    failures: int = 5
    window: float = 300.0
    lockout: float = 60.0
    max_lockout: float = 900.0
    forget_after: float = 3600.0
    max_tracked: int = 10_000
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if self.failures < 1 or self.max_tracked < 1:
            raise ValueError("sign-in limits: failures and max_tracked must be at least 1")
        if not 0 < self.lockout <= self.max_lockout:
            raise ValueError("sign-in limits: need 0 < lockout <= max_lockout")
        if self.window <= 0 or self.forget_after < max(self.window, self.max_lockout):
            # Forgetting a key sooner would end its lock or its window early.
            raise ValueError("sign-in limits: need forget_after >= window and >= max_lockout")


@dataclass
class _Key:
    failures: deque[float]
    last_failure: float = 0.0
    locked_until: float = 0.0
    locks: int = 0  # locks so far: the next one waits lockout * 2**locks
    checking: int = 0  # attempts of this key now being checked by the broker


def address_key(host: str | None) -> str:
    """The client address a limit counts by: IPv6 by its /64, anything else as is."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def in_words(seconds: float) -> str:
    """A wait as a person says it: ``45 seconds``, ``1 minute``, ``15 minutes``."""
    whole = max(1, math.ceil(seconds))
    if whole < 60:
        return f"{whole} second{'s' if whole != 1 else ''}"
    minutes = math.ceil(whole / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


class _Table:
    """Keys of one kind (users or addresses), the least recently failed first."""

    def __init__(self, limits: SignInLimits) -> None:
        self.limits = limits
        self.keys: OrderedDict[str, _Key] = OrderedDict()

    def forget_old(self, now: float) -> None:
        # Ordered by last failure, and a key's lock ends before forget_after passes
        # (checked in SignInLimits), so the expired ones are at the front.
        while self.keys:
            key, state = next(iter(self.keys.items()))
            if now - state.last_failure <= self.limits.forget_after or state.checking:
                break
            del self.keys[key]

    def get(self, key: str) -> _Key | None:
        return self.keys.get(key)

    def get_or_add(self, key: str, now: float) -> _Key:
        state = self.keys.get(key)
        if state is None:
            self.forget_old(now)
            while len(self.keys) >= self.limits.max_tracked:
                self.keys.popitem(last=False)
            state = _Key(failures=deque(maxlen=self.limits.failures), last_failure=now)
            self.keys[key] = state
        return state

    def wait(self, key: str, now: float) -> float:
        """Seconds ``key`` must wait before another attempt (0: it may try now)."""
        state = self.keys.get(key)
        if state is None:
            return 0.0
        if state.locked_until > now:
            return state.locked_until - now
        recent = sum(1 for at in state.failures if now - at <= self.limits.window)
        if recent + state.checking >= self.limits.failures:
            # Its last allowed attempts are being checked right now: parallel guesses
            # must not slip past the limit while the broker answers.
            return 1.0
        return 0.0

    def failed(self, key: str, now: float) -> float | None:
        """Count a failure; the new lock's length when this one starts a lock."""
        state = self.get_or_add(key, now)
        state.checking = max(0, state.checking - 1)
        state.failures.append(now)
        state.last_failure = now
        self.keys.move_to_end(key)
        recent = [at for at in state.failures if now - at <= self.limits.window]
        if len(recent) < self.limits.failures or state.locked_until > now:
            return None
        wait = min(self.limits.lockout * 2.0**state.locks, self.limits.max_lockout)
        if wait < self.limits.max_lockout:  # past the bound the exponent need not grow
            state.locks += 1
        state.locked_until = now + wait
        state.failures.clear()
        return wait

    def done(self, key: str) -> None:
        """An attempt ended without a failure to count."""
        state = self.keys.get(key)
        if state is None:
            return
        state.checking = max(0, state.checking - 1)
        if not state.failures and not state.locks and not state.checking:
            del self.keys[key]


class SignInLimiter:
    """Decides whether a sign-in may reach the broker, and counts how it went.

    ``begin`` before asking the broker (raises ``TooManySignIns`` when limited), then
    exactly one of ``failed``, ``succeeded`` or ``abandoned``."""

    def __init__(self, limits: SignInLimits | None = None) -> None:
        self.limits = limits or SignInLimits()
        self.users = _Table(self.limits)
        self.addresses = _Table(self.limits)

    def __len__(self) -> int:
        """Keys tracked, users and addresses together."""
        return len(self.users.keys) + len(self.addresses.keys)

    def begin(self, user: str, address: str) -> None:
        now = self.limits.clock()
        self.users.forget_old(now)
        self.addresses.forget_old(now)
        wait = max(self.users.wait(user, now), self.addresses.wait(address, now))
        if wait > 0:
            raise TooManySignIns(
                "too many failed sign-ins for this user or from this address; "
                f"try again in {in_words(wait)}",
                retry_after=wait,
            )
        for table, key in ((self.users, user), (self.addresses, address)):
            table.get_or_add(key, now).checking += 1

    def failed(self, user: str, address: str) -> None:
        now = self.limits.clock()
        for table, key, kind in ((self.users, user, "user"), (self.addresses, address, "address")):
            wait = table.failed(key, now)
            if wait is not None:
                log.warning(
                    "console sign-in limited for %s %r: %d failed sign-ins within %g s "
                    "(last: user %r from address %s); attempts refused for %g s",
                    kind,
                    key,
                    self.limits.failures,
                    self.limits.window,
                    user,
                    address,
                    wait,
                )

    def succeeded(self, user: str, address: str) -> None:
        self.users.keys.pop(user, None)
        self.addresses.done(address)

    def abandoned(self, user: str, address: str) -> None:
        """The attempt stopped before the broker answered (cancelled): nothing to count."""
        self.users.done(user)
        self.addresses.done(address)
