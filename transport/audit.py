"""Reading the audit stream: the whole event history, from the broker alone.

The audit stream is a RabbitMQ stream queue bound to every event. An auditor reads it
from the first offset or from a timestamp, without the coordinator, and can verify each
session's hash chain from what it read (``contracts.verify_chain``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from contracts.codec import codec_for
from contracts.errors import DecodeError
from contracts.events import EventEnvelope
from contracts.topology import Topology
from transport.port import Delivery, Transport

__all__ = ["read_audit_stream"]


async def read_audit_stream(
    transport: Transport,
    topology: Topology,
    *,
    since: datetime | None = None,
    idle_seconds: float = 1.0,
    limit: int | None = None,
    prefetch: int = 500,
) -> AsyncIterator[EventEnvelope | DecodeError]:
    """Yield every event in the audit stream (from ``since``, else from the first
    offset) until none arrives for ``idle_seconds``. An undecodable entry is yielded as
    its ``DecodeError`` so the caller can report it without losing its place."""
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_delivery(delivery: Delivery) -> None:
        await inbox.put(delivery)

    offset: Any = since if since is not None else "first"
    handle = await transport.consume(
        topology.audit_stream, on_delivery, prefetch=prefetch, arguments={"x-stream-offset": offset}
    )
    count = 0
    try:
        while limit is None or count < limit:
            try:
                delivery = await asyncio.wait_for(inbox.get(), idle_seconds)
            except TimeoutError:
                return
            try:
                yield codec_for(delivery.content_type).decode_envelope(delivery.body)
            except DecodeError as exc:
                yield exc
            finally:
                await delivery.ack()
            count += 1
    finally:
        with contextlib.suppress(Exception):
            await handle.close()
