"""Fixtures of the bus suite: one ``Bus`` per test, on the in-process broker or on the
real RabbitMQ under the test's own topology prefix.

Tests that take ``bus`` run on both brokers (the RabbitMQ run is marked ``broker``);
tests that take ``amqp_bus`` are RabbitMQ only and carry the ``broker`` mark themselves.
Every RabbitMQ connection is named after the test (``<node id> <role>``), so the broker
UI and the fault tests can tell them apart.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pytest

from contracts import Topology
from coordinator.domain.identity import IdentityMap
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CoordinatorClient, SessionManager
from module_sdk.testing import InProcessBus
from tests.support.broker_admin import create_user, delete_user, user_url
from transport.amqp import AmqpTransport
from transport.port import Transport

M = TypeVar("M", bound=SessionManager)

BUS_KINDS = ["memory", pytest.param("amqp", marks=pytest.mark.broker)]


@dataclass
class Bus:
    """One test's broker: transports, a coordinator runtime and modules on it."""

    kind: Literal["memory", "amqp"]
    prefix: str
    test_id: str
    url: str | None = None
    memory: InProcessBus | None = None
    opened: list[Transport] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    def connection_name(self, role: str) -> str:
        return f"{self.test_id} {role}"

    def transport(
        self,
        role: str,
        *,
        user: str = "guest",
        password: str = "guest",  # noqa: S107 - RabbitMQ's default user
    ) -> Transport:
        """A transport (not connected) for one party of the test."""
        if self.memory is not None:
            return self.memory.transport(user)
        assert self.url is not None
        url = self.url if user == "guest" else user_url(self.url, user, password)
        return AmqpTransport(url, connection_name=self.connection_name(role))

    async def connect(self, role: str, **credentials: str) -> Transport:
        """A connected transport, closed at the end of the test."""
        transport = self.transport(role, **credentials)
        await transport.connect()
        self.opened.append(transport)
        return transport

    async def client(self, role: str = "client", **options: Any) -> CoordinatorClient:
        """A coordinator client on its own connection."""
        return CoordinatorClient(await self.connect(role), self.topology, **options)

    def runtime(
        self,
        *,
        store: str = "memory://",
        identity: str = "guest=*",
        credentials: dict[str, str] | None = None,
        **options: Any,
    ) -> CoordinatorRuntime:
        """A coordinator on this bus (on its own connection), not yet started."""
        return CoordinatorRuntime(
            self.transport("coordinator", **(credentials or {})),
            store=store,
            topology=self.topology,
            identity=IdentityMap.parse(identity),
            **options,
        )

    def module(self, cls: type[M], role: str | None = None, **options: Any) -> M:
        """A module's manager on its own connection (closed with it), not yet started."""
        options.setdefault("heartbeat_interval", 0.5)
        module_id = options.get("module_id") or cls.module_id
        credentials = options.pop("credentials", {})
        return cls(
            self.transport(role or f"module {module_id}", **credentials),
            topology=self.topology,
            own_transport=True,
            **options,
        )

    async def aclose(self) -> None:
        for transport in reversed(self.opened):
            with contextlib.suppress(Exception):
                await transport.close()


class BrokerUsers:
    """Broker users of this test, ``<prefix>-<role>``, made on first use and deleted
    at the end of the test (after its connections are closed)."""

    password = "sessionbus-test-secret"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.made: list[str] = []

    def __call__(self, role: str) -> dict[str, str]:
        """Credentials of the user for ``role`` (for ``Bus.transport`` and friends)."""
        name = f"{self.prefix}-{role}"
        if name not in self.made:
            create_user(name, self.password)
            self.made.append(name)
        return {"user": name, "password": self.password}

    def delete_all(self) -> None:
        for name in self.made:
            delete_user(name)


@pytest.fixture
def broker_users(prefix: str) -> Iterator[BrokerUsers]:
    """Per-test broker users (RabbitMQ only)."""
    users = BrokerUsers(prefix)
    try:
        yield users
    finally:
        users.delete_all()


def _test_id(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid[-180:]


@pytest.fixture(params=BUS_KINDS)
def bus_target(request: pytest.FixtureRequest) -> tuple[str, str, str | None]:
    """(kind, prefix, url): resolved outside the event loop, since the broker fixtures
    check the broker with their own ``asyncio.run``."""
    if request.param == "memory":
        return "memory", f"m{uuid.uuid4().hex[:8]}", None
    return "amqp", request.getfixturevalue("prefix"), request.getfixturevalue("amqp_url")


@pytest.fixture
async def bus(
    request: pytest.FixtureRequest, bus_target: tuple[str, str, str | None]
) -> AsyncIterator[Bus]:
    """The in-process broker, then the real RabbitMQ under the test's own prefix."""
    kind, prefix_, url = bus_target
    if kind == "memory":
        value = Bus("memory", prefix_, _test_id(request), memory=InProcessBus())
    else:
        value = Bus("amqp", prefix_, _test_id(request), url=url)
    try:
        yield value
    finally:
        await value.aclose()


@pytest.fixture
async def amqp_bus(
    request: pytest.FixtureRequest, amqp_url: str, prefix: str, broker_users: BrokerUsers
) -> AsyncIterator[Bus]:
    """The real RabbitMQ under the test's own prefix. (It depends on ``broker_users``
    so that its connections are closed before the test's broker users are deleted.)"""
    value = Bus("amqp", prefix, _test_id(request), url=amqp_url)
    try:
        yield value
    finally:
        await value.aclose()
