"""Helpers shared by the bus tests: a recording consumer, queue draining, and a module
that records what its hooks and callbacks were asked to do."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from contracts import (
    ModuleSessionConfig,
    ModuleSessionInfo,
    SessionStatus,
    StandardError,
    Topology,
    WorkflowSession,
)
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import SessionLifecycleCallbacks, SessionManager
from module_sdk.testing import wait_for
from sessionctl.admin import unsettled_dead_letters
from transport.port import Delivery, Transport

Settle = Callable[[Delivery], Awaitable[None]]


async def ack(delivery: Delivery) -> None:
    await delivery.ack()


class Inbox:
    """A consumer handler that keeps every delivery and settles it by ``policy``."""

    def __init__(self, policy: Settle = ack) -> None:
        self.policy = policy
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        await self.policy(delivery)

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    async def wait(self, count: int, *, timeout: float = 10.0) -> None:
        await wait_for(
            lambda: len(self.deliveries) >= count,
            timeout=timeout,
            what=f"{count} deliveries (have {len(self.deliveries)})",
        )


async def take(
    transport: Transport, queue: str, count: int, *, timeout: float = 10.0
) -> list[Delivery]:
    """``count`` messages taken from ``queue`` with basic.get and acked (waiting, bounded,
    for them to arrive)."""
    taken: list[Delivery] = []

    async def more() -> bool:
        while len(taken) < count:
            delivery = await transport.get(queue)
            if delivery is None:
                return False
            await delivery.ack()
            taken.append(delivery)
        return True

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await more():
        if loop.time() > deadline:
            raise TimeoutError(f"{queue}: {len(taken)} of {count} messages after {timeout} s")
        await asyncio.sleep(0.02)
    return taken


async def dead_letters(
    transport: Transport, topology: Topology, count: int, *, timeout: float = 10.0
) -> list[Delivery]:
    """The dead letters not yet settled, once there are at least ``count`` (read from
    the dead-letter stream, which keeps them; waiting, bounded, for them to arrive)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(letters := await unsettled_dead_letters(transport, topology)) < count:
        if loop.time() > deadline:
            raise TimeoutError(f"{len(letters)} of {count} dead letters after {timeout} s")
        await asyncio.sleep(0.05)
    return letters


async def drain(transport: Transport, queue: str) -> list[Delivery]:
    """Every message in ``queue`` now, taken and acked."""
    taken: list[Delivery] = []
    while (delivery := await transport.get(queue)) is not None:
        await delivery.ack()
        taken.append(delivery)
    return taken


async def wait_status(
    runtime: CoordinatorRuntime,
    session_id: uuid.UUID,
    status: SessionStatus,
    *,
    timeout: float = 10.0,
) -> WorkflowSession:
    """Wait until the coordinator's projection shows ``session_id`` in ``status``."""
    projections = runtime.coordinator.projections

    def reached() -> bool:
        session = projections.sessions.get(session_id)
        return session is not None and session.status is status

    await wait_for(reached, timeout=timeout, what=f"session {session_id} {status}")
    return projections.sessions[session_id]


async def wait_destroyed(
    runtime: CoordinatorRuntime, session_id: uuid.UUID, *, timeout: float = 10.0
) -> None:
    projections = runtime.coordinator.projections
    await wait_for(
        lambda: session_id in projections.recently_destroyed,
        timeout=timeout,
        what=f"session {session_id} destroyed",
    )


class RecordingModule(SessionManager):
    """A module that records its hooks and callbacks.

    ``fail_creates``: how many create attempts per session fail before one succeeds.
    ``join``: whether it takes part in new sessions (``False``: it only observes).
    ``hold``: sessions whose status-change callback blocks until ``release`` is set.
    """

    module_id = "executor"

    def __init__(
        self,
        transport: Transport,
        *,
        fail_creates: int = 0,
        join: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(transport, **options)
        self.fail_creates = fail_creates
        self.join = join
        self.attempts: dict[uuid.UUID, int] = {}
        self.created: dict[uuid.UUID, tuple[uuid.UUID, ModuleSessionConfig]] = {}
        self.made: list[uuid.UUID] = []  # every module session on_create made
        self.destroyed: list[ModuleSessionInfo] = []
        self.events: list[tuple[Any, ...]] = []
        self.hold: set[uuid.UUID] = set()
        self.release = asyncio.Event()
        self.consumer.stats.record_versions = True
        self.set_lifecycle_callbacks(
            SessionLifecycleCallbacks(
                on_session_created=self._created,
                on_session_status_changed=self._status,
                on_session_destroyed=self._destroyed_cb,
                on_session_error=self._error,
            )
        )

    async def on_create(
        self, session: WorkflowSession, module_session_id: uuid.UUID, config: ModuleSessionConfig
    ) -> dict[str, Any]:
        sid = session.session_id
        self.attempts[sid] = self.attempts.get(sid, 0) + 1
        if self.attempts[sid] <= self.fail_creates:
            raise RuntimeError(f"attempt {self.attempts[sid]}: the browser did not start")
        self.created[sid] = (module_session_id, config)
        self.made.append(module_session_id)
        return {"made-by": self.module_id, "attempt": self.attempts[sid]}

    async def on_destroy(self, info: ModuleSessionInfo) -> None:
        self.destroyed.append(info)

    def should_join(self, session: WorkflowSession) -> bool:
        return self.join

    async def _created(self, module_id: str, wsid: uuid.UUID, msid: uuid.UUID) -> None:
        self.events.append(("created", module_id, wsid, msid))

    async def _status(
        self, module_id: str, wsid: uuid.UUID, old: SessionStatus, new: SessionStatus
    ) -> None:
        self.events.append(("status", module_id, wsid, old, new))
        if wsid in self.hold:
            await self.release.wait()

    async def _destroyed_cb(self, module_id: str, wsid: uuid.UUID) -> None:
        self.events.append(("destroyed", module_id, wsid))

    async def _error(self, module_id: str, wsid: uuid.UUID, error: StandardError) -> None:
        self.events.append(("error", module_id, wsid, error.code))

    def events_of(self, kind: str, wsid: uuid.UUID) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind and e[2] == wsid]


class Observer:
    """A plain aio-pika queue bound ``#`` to an exchange: what the broker really routed,
    with every AMQP property, seen independently of the transport under test."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue

    @classmethod
    async def bind(cls, connection: object, exchange: str, name: str) -> Observer:
        assert isinstance(connection, AbstractConnection)
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, "#")
        return cls(queue)

    async def drain(self) -> list[AbstractIncomingMessage]:
        """Every message in the queue now."""
        taken: list[AbstractIncomingMessage] = []
        while (msg := await self.queue.get(no_ack=True, fail=False)) is not None:
            taken.append(msg)
        return taken
