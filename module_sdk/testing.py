"""The in-process bus for module authors' tests and the embedded demo.

``InProcessBus`` is a broker in this process (``transport.memory``) with the same
routing, acknowledgement, dead-lettering and identity rules as RabbitMQ. Give each
party its own transport: ``bus.transport("executor")`` connects as broker user
``executor``, so identity checks behave as they do on a real broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from transport.memory import MemoryBroker, MemoryTransport, Permissions

__all__ = ["InProcessBus", "Permissions", "wait_for"]


class InProcessBus(MemoryBroker):
    """A broker in this process. ``users`` restricts who may connect and publish where
    (``None``: anyone, anywhere)."""

    def __init__(self, users: Mapping[str, Permissions] | None = None) -> None:
        super().__init__(users)

    def transport(self, user: str = "guest") -> MemoryTransport:
        return MemoryTransport(self, user)


async def wait_for(
    predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "condition"
) -> None:
    """Wait until ``predicate()`` is true, yielding to the loop between looks; raise
    ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)
