"""Fencing of the outbox relay: a relay without the leadership lease publishes nothing,
and a relay that lags behind another (a deposed leader saving late) cannot move the
shared relay checkpoint backwards."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.service.relay import OutboxRelay
from module_sdk.testing import wait_for
from tests.support.relay_rig import relay_rig

pytestmark = pytest.mark.faults


async def test_a_fenced_relay_publishes_nothing_and_a_late_save_never_moves_back() -> None:
    async with relay_rig("fencing") as rig:
        store, seen, coordinator = rig.store, rig.published, rig.coordinator
        lease = {"old": True, "new": False}
        old = OutboxRelay(store, rig.transport, rig.topology, fence=lambda: lease["old"])
        new = OutboxRelay(store, rig.transport, rig.topology, fence=lambda: lease["new"])
        coordinator.add_commit_listener(old.offer)
        coordinator.add_commit_listener(new.offer)
        await old.start()
        await new.start()
        try:
            await coordinator.create_workflow_session(["first"])
            await old.wait_idle()
            first = set(seen)
            assert first, "the leader published nothing"

            # The old leader's lease runs out; the new one has not started publishing yet.
            lease["old"] = False
            for index in range(3):
                await coordinator.create_workflow_session([f"while-fenced-{index}"])
            await asyncio.sleep(1.5)  # more than a relay's poll: nobody may publish now
            assert set(seen) == first

            lease["new"] = True
            new.wake()
            everything = {e.event_id for e in await asyncio.to_thread(store.read, 0, 1000)}
            await wait_for(lambda: set(seen) == everything, timeout=5, what="the new leader")
            await new.wait_idle()
            top = store.max_position()
            assert store.checkpoints.get(new.checkpoint) == (top, b"")

            # The old relay, behind, saves its position late: the checkpoint stays.
            assert old.position < top
            old.position = old.position + 1
            await old._save(force=True)
            assert store.checkpoints.get(old.checkpoint) == (top, b"")
        finally:
            await old.close()
            await new.close()
