"""Dead letters stay exactly as they were, however often they are listed, until an
operator replays or discards them (on RabbitMQ 3.10 and 4.x, and on the in-process
broker)."""

from __future__ import annotations

import dataclasses

from contracts import HEADERS
from contracts.topology import QueueSpec
from sessionctl.admin import browse_dead_letters, discard_dead_letters, replay_dead_letters
from tests.bus.conftest import Bus
from tests.bus.support import dead_letters, take
from transport.port import OutgoingMessage, Transport
from transport.topology import dead_letter, declare_topology

LISTINGS = 100


async def _rejected_by_a_consumer(t: Transport, bus: Bus, work: str, count: int) -> None:
    """``count`` messages taken from ``work`` and dead-lettered by our code, with reasons."""
    for index in range(count):
        await t.publish(
            "",
            work,
            OutgoingMessage(b'{"n": %d' % index, "application/json", message_id=f"bad-{index}"),
        )
        delivery = await t.get(work)
        assert delivery is not None
        await dead_letter(
            t,
            bus.topology,
            delivery,
            reason=f"malformed json {index}",
            code="INVALID_MESSAGE",
            rejected_by="tests",
        )


async def _dead_lettered_by_the_broker(t: Transport, bus: Bus) -> str:
    """One message the broker dead-letters itself: requeued past the delivery limit of
    the unroutable-events queue (a quorum queue whose limit and dead-letter exchange the
    topology sets explicitly)."""
    topo = bus.topology
    (spec,) = [q for q in topo.queue_specs() if q.name == topo.unroutable_queue]
    await t.publish(
        "", spec.name, OutgoingMessage(b"poison", "application/json", message_id="limit")
    )
    limit = int(spec.arguments["x-delivery-limit"])
    for _ in range(limit + 1):
        delivery = await t.get(spec.name)
        assert delivery is not None, "dead-lettered before the limit"
        await delivery.requeue()
    assert await t.get(spec.name) is None
    return spec.name


async def test_letters_listed_a_hundred_times_are_unchanged_and_replayed_after(bus: Bus) -> None:
    t = await bus.connect("operator")
    topo = bus.topology
    await declare_topology(t, topo)
    work = f"{bus.prefix}.work"
    await t.declare_queue(QueueSpec(work))
    await _rejected_by_a_consumer(t, bus, work, 3)
    unroutable = await _dead_lettered_by_the_broker(t, bus)
    await dead_letters(t, topo, 4)

    first = await browse_dead_letters(t, topo)
    assert sorted(d.message_id or "" for d in first) == ["bad-0", "bad-1", "bad-2", "limit"]
    for _ in range(LISTINGS - 1):
        assert await browse_dead_letters(t, topo) == first
    by_id = {d.message_id: d for d in first}
    assert by_id["bad-1"].reason == "malformed json 1"
    assert by_id["bad-1"].headers[HEADERS.REJECT_CODE] == "INVALID_MESSAGE"

    replayed, left = await replay_dead_letters(t, topo)
    assert (replayed, left) == (4, 0)
    back = await take(t, work, 3)
    assert sorted(d.body for d in back) == [b'{"n": 0', b'{"n": 1', b'{"n": 2']
    assert all(HEADERS.REJECT_REASON not in d.headers for d in back)
    (again,) = await take(t, unroutable, 1)
    assert (again.body, again.message_id) == (b"poison", "limit")
    assert await browse_dead_letters(t, topo) == []
    assert await replay_dead_letters(t, topo) == (0, 0)


async def test_one_letter_is_replayed_or_discarded_and_the_others_stay(bus: Bus) -> None:
    t = await bus.connect("operator")
    topo = bus.topology
    await declare_topology(t, topo)
    work = f"{bus.prefix}.work"
    await t.declare_queue(QueueSpec(work))
    await _rejected_by_a_consumer(t, bus, work, 3)
    letters = await browse_dead_letters(t, topo)
    assert len(letters) == 3

    assert await replay_dead_letters(t, topo, message_id="bad-0") == (1, 2)
    (back,) = await take(t, work, 1)
    assert back.message_id == "bad-0"
    offset = next(d.offset for d in letters if d.message_id == "bad-2")
    assert await discard_dead_letters(t, topo, offset=offset) == (1, 1)
    (kept,) = await browse_dead_letters(t, topo)
    assert dataclasses.asdict(kept) == dataclasses.asdict(
        next(d for d in letters if d.message_id == "bad-1")
    )
    assert await t.get(work) is None
