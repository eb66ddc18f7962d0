"""A command sent again while the first copy still waits for the writer (a client that
timed out while the store was away) lands in the same group commit as the first copy:
both copies get the first one's answer, and the command is applied once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from contracts import CommandRequest, CreateWorkflowSession, SessionCreated, new_id
from coordinator.service.coordinator import SessionCoordinator


async def test_copies_of_one_command_in_one_batch_are_applied_once_and_answered_alike(
    coordinator: SessionCoordinator,
) -> None:
    sid = new_id()
    request = CommandRequest(
        command_id=new_id(),
        issued_at=datetime.now(UTC),
        command=CreateWorkflowSession(session_id=sid, steps=["s"]),
    )
    writer = coordinator._writer
    assert writer is not None
    batches = writer.batches
    # Handed to the writer in one pass of the event loop: one batch.
    replies = await asyncio.gather(*(coordinator.execute(request) for _ in range(3)))
    assert writer.batches == batches + 1
    assert [r.error for r in replies] == [None, None, None], replies
    assert replies[0].result == replies[1].result == replies[2].result
    store = coordinator.store
    assert store is not None
    created = [e for e in store.history(sid) if isinstance(e.event, SessionCreated)]
    assert len(created) == 1
