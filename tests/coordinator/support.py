"""Small helpers shared by the coordinator-core tests."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import Any

import pytest

from contracts import ErrorCode, EventEnvelope
from coordinator.errors import CommandRejected
from coordinator.service.coordinator import SessionCoordinator
from coordinator.store.eventstore import EventStore


async def rejection(awaitable: Awaitable[Any], code: ErrorCode) -> CommandRejected:
    """Await a command that must be rejected with ``code``; return the rejection."""
    with pytest.raises(CommandRejected) as info:
        await awaitable
    assert info.value.code is code, f"expected {code}, got {info.value.code}: {info.value}"
    return info.value


async def history(coordinator: SessionCoordinator, session_id: uuid.UUID) -> list[EventEnvelope]:
    """Every stored event of one session."""
    return (await coordinator.get_session_history(session_id)).events


async def event_types(coordinator: SessionCoordinator, session_id: uuid.UUID) -> list[str]:
    """The wire tags of a session's events, in order."""
    return [env.type for env in await history(coordinator, session_id)]


def store_of(coordinator: SessionCoordinator) -> EventStore:
    """The coordinator's event store (it has one once started)."""
    assert coordinator.store is not None
    return coordinator.store


def position(coordinator: SessionCoordinator) -> int:
    """The store's highest global position: how many events are stored."""
    return store_of(coordinator).max_position()
