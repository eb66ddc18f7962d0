"""An outbox relay's surroundings on the in-process broker: the topology declared, a
tap queue counting how often each event id was published, and a coordinator on a
memory store. The relay tests start their own relays on it."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from contracts import Topology, codec_for
from contracts.topology import QueueSpec
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore
from module_sdk.testing import InProcessBus
from transport.port import Delivery, Transport
from transport.topology import declare_topology


@dataclass
class RelayRig:
    topology: Topology
    transport: Transport
    coordinator: SessionCoordinator
    store: EventStore
    published: Counter[uuid.UUID]  # event id -> times it reached the events exchange


@asynccontextmanager
async def relay_rig(prefix: str) -> AsyncIterator[RelayRig]:
    topology = Topology(prefix)
    transport = InProcessBus().transport()
    await transport.connect()
    coordinator = SessionCoordinator("memory://")
    try:
        await declare_topology(transport, topology)
        published: Counter[uuid.UUID] = Counter()

        async def on_event(delivery: Delivery) -> None:
            envelope = codec_for(delivery.content_type).decode_envelope(delivery.body)
            published[envelope.event_id] += 1
            await delivery.ack()

        tap = f"{prefix}.tap"
        await transport.declare_queue(QueueSpec(tap, bindings=[(topology.events_exchange, "#")]))
        await transport.consume(tap, on_event)
        await coordinator.start()
        assert coordinator.store is not None
        yield RelayRig(topology, transport, coordinator, coordinator.store, published)
    finally:
        await coordinator.close()
        await transport.close()
