"""What the coordinator says of each registered module, from heartbeats: how many of
its instances are alive, and the newest error one of them reported."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from contracts import (
    ErrorCode,
    Heartbeat,
    ModuleRegistered,
    SessionManagerHealth,
    StandardError,
)
from coordinator.read.projections import Projections

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def beat(instance: uuid.UUID, at: datetime, *errors: str) -> Heartbeat:
    return Heartbeat(
        module_id="executor",
        instance_id=instance,
        sent_at=at,
        interval_ms=1000,
        health=SessionManagerHealth(
            module_id="executor",
            is_healthy=True,
            active_sessions=0,
            total_sessions=0,
            last_health_check=at,
            errors=[StandardError(code=ErrorCode.MODULE_ERROR, message=m) for m in errors],
        ),
    )


def test_instances_count_fresh_heartbeats_and_the_last_error_is_the_newest() -> None:
    proj = Projections()
    proj.modules["executor"] = ModuleRegistered(module_id="executor", required=True)
    first, second = uuid.uuid4(), uuid.uuid4()
    proj.record_heartbeat(beat(first, T0, "old trouble"), T0)
    proj.record_heartbeat(beat(second, T0, "new trouble"), T0 + timedelta(seconds=1))
    (info,) = proj.module_infos(T0 + timedelta(seconds=2))
    assert info.instances == 2
    assert info.last_error is not None
    assert info.last_error.message == "new trouble"
    # The first instance falls silent: it no longer counts once its heartbeat is stale.
    proj.record_heartbeat(beat(second, T0 + timedelta(seconds=5)), T0 + timedelta(seconds=5))
    (info,) = proj.module_infos(T0 + timedelta(seconds=5))
    assert info.instances == 1
    assert info.last_error is not None
    assert info.last_error.message == "old trouble"  # the only one still reported
    # Silent for a hundred intervals: forgotten.
    proj.record_heartbeat(beat(second, T0 + timedelta(seconds=200)), T0 + timedelta(seconds=200))
    (info,) = proj.module_infos(T0 + timedelta(seconds=200))
    assert info.instances == 1
    assert info.last_error is None
