"""An open-loop schedule for the latency benchmarks: call i is due at start + i/rate,
and one that is late does not push the later ones back. No sessionbus code, so the raw
baselines use it too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

MAX_IN_FLIGHT = 512


@dataclass
class Schedule:
    started: float  # time.perf_counter() at the start
    sent: int = 0
    behind_s: float = 0.0  # how far behind its due time the latest start was
    late: int = 0  # still running at the end of the drain, cancelled


async def open_loop(
    count: int,
    rate: float,
    seconds: float,
    call: Callable[[int], Coroutine[Any, Any, None]],
    *,
    drain_s: float = 30.0,
) -> Schedule:
    """Start ``call(i)`` as a task for i in ``range(count)`` on the schedule, bounded in
    flight, in count and in time (it stops at twice ``seconds``); then wait up to
    ``drain_s`` for what is in flight and cancel the rest. The first exception a call
    raised is raised here."""
    got = Schedule(time.perf_counter())
    inflight: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    for i in range(count):
        due = got.started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() - got.started > seconds * 2:
            break  # far behind the schedule: the time bound wins
        while len(inflight) >= MAX_IN_FLIGHT:  # behind the schedule: bounded in flight
            await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        got.behind_s = max(got.behind_s, time.perf_counter() - due)
        task = asyncio.create_task(call(i))
        inflight.add(task)
        task.add_done_callback(done)
        got.sent += 1
    if inflight:
        _, late = await asyncio.wait(set(inflight), timeout=drain_s)
        for task in late:
            task.cancel()
        got.late = len(late)
    if errors:
        raise errors[0]
    return got
