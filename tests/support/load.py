"""A bounded load for the fault tests: a fixed number of workflow sessions, each driven
through create → ACTIVE → COMPLETED → destroyed with ``CoordinatorClient``, started at
a steady rate (so the load spans the faults) with bounded concurrency, within an
overall deadline.

A command that gets no answer (the coordinator or the broker is away) is sent again
with the *same* command id until the deadline: the coordinator applies it once and
answers every copy alike. A refusal (``CommandFailed``) is a failure of the run. Every
answered request's time is kept, so a test can tell how long after a fault the first
command succeeded again.
"""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from contracts import (
    Command,
    CreateWorkflowSession,
    DestroyWorkflowSession,
    ErrorCode,
    GetWorkflowSession,
    SessionResult,
    SessionStatus,
    UpdateSessionStatus,
    WorkflowConfig,
    WorkflowSession,
    new_id,
)
from module_sdk import CommandFailed, CoordinatorClient, CoordinatorUnavailable, StoreUnavailable
from transport.port import TransportError

__all__ = ["LoadResult", "SessionLoad"]

S = SessionStatus


@dataclass
class LoadResult:
    sessions: list[uuid.UUID] = field(default_factory=list)
    finished: list[uuid.UUID] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    commands: int = 0  # state-changing commands acknowledged
    queries: int = 0  # reads answered
    retries: int = 0  # requests sent again after no answer or a retryable refusal
    refused_retryable: int = 0  # of those, the ones refused with a retryable error
    answered_at: list[float] = field(default_factory=list)  # monotonic, sorted
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def elapsed(self) -> float:
        return self.ended_at - self.started_at

    def first_answer_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first answered request after it."""
        index = bisect.bisect_right(self.answered_at, moment)
        if index == len(self.answered_at):
            return None
        return self.answered_at[index] - moment

    def describe(self) -> str:
        return (
            f"{len(self.finished)}/{len(self.sessions)} sessions in {self.elapsed:.1f} s, "
            f"{self.commands} commands, {self.queries} reads, {self.retries} retries"
            + (f" ({self.refused_retryable} refused retryably)" if self.refused_retryable else "")
        )


def _refused(exc: BaseException) -> bool:
    """Whether the client gave up after replies with a retryable error
    (``StoreUnavailable``, or a cause ``CODE: …``) rather than after no reply at all."""
    if isinstance(exc, StoreUnavailable):
        return True
    cause = str(exc.__cause__ or "")
    return cause.split(":", 1)[0] in ErrorCode.__members__


class SessionLoad:
    """``await SessionLoad(client, sessions=60, rate=4).run()``."""

    def __init__(
        self,
        client: CoordinatorClient,
        *,
        sessions: int,
        rate: float | None = None,
        concurrency: int = 16,
        deadline: float = 90.0,
        config: WorkflowConfig | None = None,
        poll: float = 0.1,
        until: asyncio.Event | None = None,
    ) -> None:
        self.client = client
        self.count = sessions
        # Past ``sessions``, keep creating (at the rate) until this is set: a fault test
        # on a slow machine then still strikes mid-load, not after it (bounded below).
        self.until = until
        self.rate = rate
        self.concurrency = concurrency
        self.deadline_seconds = deadline
        self.config = config or WorkflowConfig()
        self.poll = poll
        self.result = LoadResult()
        self._deadline = 0.0
        self._answered: list[float] = []
        self._created = 0
        self.done = asyncio.Event()
        #: Called (synchronously) right after each acknowledged state-changing command:
        #: a fault test can strike at that moment (the command is committed).
        self.on_acknowledged: Callable[[Command], None] | None = None

    @property
    def created(self) -> int:
        """Sessions whose creation was acknowledged so far."""
        return self._created

    def answered_after(self, moment: float) -> bool:
        """Whether a request was answered after ``moment`` (``time.monotonic()``)."""
        return bool(self._answered) and self._answered[-1] > moment

    async def run(self) -> LoadResult:
        result = self.result
        result.started_at = time.monotonic()
        self._deadline = result.started_at + self.deadline_seconds
        gate = asyncio.Semaphore(self.concurrency)
        tasks = []
        try:
            for index in range(self.count * 20):  # bounded: ``until`` may never be set
                if index >= self.count and (
                    self.until is None or self.until.is_set() or time.monotonic() >= self._deadline
                ):
                    break
                if self.rate:
                    due = result.started_at + index / self.rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                await gate.acquire()
                sid = new_id()
                result.sessions.append(sid)
                tasks.append(asyncio.create_task(self._one(sid, index, gate)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            result.ended_at = time.monotonic()
            result.answered_at = sorted(self._answered)
            self.done.set()
        return result

    async def _one(self, sid: uuid.UUID, index: int, gate: asyncio.Semaphore) -> None:
        try:
            await self._command(
                CreateWorkflowSession(session_id=sid, steps=[f"step-{index}"], config=self.config)
            )
            self._created += 1
            state = await self._until(
                sid, lambda s: s is not None and s.status is not S.INITIALIZING
            )
            if state is None or state.status is not S.ACTIVE:
                failure = state.failure if state is not None else None
                self.result.failures.append(
                    f"{sid}: {state.status if state else 'gone'} instead of ACTIVE ({failure})"
                )
            else:
                await self._command(UpdateSessionStatus(session_id=sid, status=S.COMPLETED))
            await self._command(DestroyWorkflowSession(session_id=sid))
            await self._until(sid, lambda s: s is None or s.destroyed)
            self.result.finished.append(sid)
        except CommandFailed as exc:
            self.result.failures.append(f"{sid}: refused: {exc}")
        except TimeoutError as exc:
            self.result.failures.append(f"{sid}: {exc}")
        finally:
            gate.release()

    async def _send(self, command: Command, command_id: uuid.UUID) -> object:
        """Send until answered (same command id each time) or the deadline passes."""
        while True:
            try:
                result = await self.client.call(command, command_id=command_id)
            except (CoordinatorUnavailable, TransportError) as exc:
                self.result.retries += 1
                if _refused(exc):
                    self.result.refused_retryable += 1
                if time.monotonic() > self._deadline:
                    raise TimeoutError(
                        f"{type(command).__name__} unanswered at the load's deadline: {exc}"
                    ) from exc
                await asyncio.sleep(0.1)
                continue
            self._answered.append(time.monotonic())
            return result

    async def _command(self, command: Command) -> None:
        await self._send(command, new_id())
        self.result.commands += 1
        if self.on_acknowledged is not None:
            self.on_acknowledged(command)

    async def _until(
        self, sid: uuid.UUID, predicate: Callable[[WorkflowSession | None], bool]
    ) -> WorkflowSession | None:
        """Read the session until ``predicate(session)`` holds; the last state read."""
        wait = self.poll
        while True:
            answer = await self._send(GetWorkflowSession(session_id=sid), new_id())
            self.result.queries += 1
            assert isinstance(answer, SessionResult)
            if predicate(answer.session):
                return answer.session
            if time.monotonic() > self._deadline:
                raise TimeoutError(f"session {sid} still {answer.session} at the deadline")
            await asyncio.sleep(wait)
            wait = min(wait * 1.5, 0.5)
