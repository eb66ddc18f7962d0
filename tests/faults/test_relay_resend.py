"""The relay's answer to a broker that drops confirmed messages from a stream after a
restart (RabbitMQ 3.10.8: the audit stream loses what is published between the
reconnect and the stream's leader coming back, yet confirms it): after the connection
is restored, what was published since is published once more, a grace period later.

Here the reconnect is simulated on the in-process broker (its ``reconnects`` count),
so the re-publication is checked exactly: the events committed after the reconnect go
out twice, the ones before once. ``test_broker_restart`` checks the same end to end on
a real broker restarted three times.
"""

from __future__ import annotations

import asyncio

import pytest

from coordinator.service import relay as relay_module
from coordinator.service.relay import OutboxRelay
from module_sdk.testing import wait_for
from tests.support.relay_rig import relay_rig

pytestmark = pytest.mark.faults


async def test_what_was_published_after_a_reconnect_is_published_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "RESEND_AFTER_RECONNECT", 0.2)
    async with relay_rig("resend") as rig:
        store, seen, coordinator = rig.store, rig.published, rig.coordinator
        transport = rig.transport
        relay = OutboxRelay(store, transport, rig.topology)
        coordinator.add_commit_listener(relay.wake)
        await relay.start()
        try:
            for index in range(3):
                await coordinator.create_workflow_session([f"before-{index}"])
            before = {e.event_id for e in await asyncio.to_thread(store.read, 0, 1000)}
            await wait_for(lambda: set(seen) == before, timeout=5, what="the first events")
            # Delivered is not yet confirmed: a reconnect noticed while the last page is
            # still out counts that page as published after it, so wait for the relay.
            await relay.wait_idle()

            transport.reconnects += 1  # the connection was lost and restored
            for index in range(3):
                await coordinator.create_workflow_session([f"after-{index}"])
            every = {e.event_id for e in await asyncio.to_thread(store.read, 0, 1000)}
            after = every - before
            await wait_for(
                lambda: all(seen[e] == 2 for e in after), timeout=5, what="the re-publication"
            )
            await asyncio.sleep(1.2)  # one more relay round: nothing else goes out again
            assert {e: n for e, n in seen.items() if n > 1} == dict.fromkeys(after, 2)
            assert all(seen[e] == 1 for e in before)
            assert relay.resent == len(after)
        finally:
            await relay.close()
