"""No caller is stranded while the store is away: every command, whichever store call
fails under it (loading a session, reading the log before a group commit, reading it
after one, an error nobody foresaw), is answered within a bounded time, with a
retryable ``STORE_UNAVAILABLE`` when the store is the cause, and nothing unstored is
reported as stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from contracts import (
    Accepted,
    CommandRequest,
    CreateWorkflowSession,
    ErrorCode,
    GetSessionHistory,
    SessionStatus,
    WorkflowConfig,
    new_id,
)
from coordinator.domain.clock import ManualClock
from coordinator.errors import CommandRejected, StoreReadOnly, StoreUnavailable
from coordinator.service.coordinator import SessionCoordinator
from coordinator.service.writer import WriteJob
from tests.coordinator.support import rejection, store_of

S = SessionStatus
T = TypeVar("T")
# Far more than any pass takes here; a stranded caller waits for ever.
ANSWERED_WITHIN = 20.0


async def answered(awaitable: Awaitable[T]) -> T:
    """The awaitable's result, or a failure saying the caller was left waiting."""
    try:
        return await asyncio.wait_for(awaitable, ANSWERED_WITHIN)
    except TimeoutError:
        pytest.fail(f"no answer within {ANSWERED_WITHIN} s: the caller is stranded")


class FailingStore:
    """Makes the named ``EventStore`` methods fail on demand, as a store that has gone
    away does (``StoreUnavailable``), or with ``error`` if given."""

    METHODS = ("max_position", "read", "load", "save", "history")

    def __init__(self, coordinator: SessionCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = store_of(coordinator)
        self.failing: set[str] = set()
        self.error: Exception | None = None
        self.delay = 0.0  # seconds each failing call takes, as connection retries do
        self.calls: dict[str, int] = dict.fromkeys(self.METHODS, 0)
        self.writer_calls = 0  # failing calls made by the writer's own passes
        for name in self.METHODS:
            monkeypatch.setattr(self.store, name, self._wrap(name, getattr(self.store, name)))

    def _wrap(self, name: str, real: Any) -> Any:
        def method(*args: Any, **kwargs: Any) -> Any:
            if name in self.failing:
                self.calls[name] += 1
                if threading.current_thread().name == "sessionbus-writer":
                    self.writer_calls += 1
                time.sleep(self.delay)  # on a store thread, as a real retry would
                raise self.error or StoreUnavailable(f"{name}: the database is away")
            return real(*args, **kwargs)

        return method

    def fail(self, *names: str) -> None:
        self.failing = set(names or self.METHODS)

    def heal(self) -> None:
        self.failing = set()
        self.error = None


def stored_positions(coordinator: SessionCoordinator) -> int:
    store = store_of(coordinator)
    # The real method, whatever a test patched on the instance.
    return type(store).max_position(store)


async def test_a_command_on_a_session_that_cannot_be_loaded_is_refused_retryable(
    store_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart the writer holds no session: loading one fails while the store
    is away, and the command is refused with a retryable STORE_UNAVAILABLE (not an
    INTERNAL error the client would give up on); once the store is back it applies."""
    async with SessionCoordinator(store_url, clock=clock) as first:
        sid = (await first.create_workflow_session()).session_id
    async with SessionCoordinator(store_url, clock=clock) as coordinator:
        failing = FailingStore(coordinator, monkeypatch)
        failing.fail("load")
        refused = await answered(
            rejection(coordinator.update_session_status(sid, S.PAUSED), ErrorCode.STORE_UNAVAILABLE)
        )
        assert refused.retryable
        assert failing.calls["load"] >= 1
        failing.heal()
        accepted = await answered(coordinator.update_session_status(sid, S.PAUSED))
        assert accepted == Accepted(session_id=sid, version=3, events=1)


async def test_due_timeouts_whose_sessions_cannot_be_loaded_strand_no_caller(
    store_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout falls due while the store is away and its session must be loaded:
    the pass is answered (refused, retryable) instead of dying with the callers in it,
    and the timeout fires once the store is back."""
    config = WorkflowConfig(timeout_ms=1_000)
    async with SessionCoordinator(store_url, clock=clock) as first:
        sid = (await first.create_workflow_session(config=config)).session_id
    async with SessionCoordinator(store_url, clock=clock) as coordinator:
        failing = FailingStore(coordinator, monkeypatch)
        failing.fail("load")
        clock.advance(seconds=2)
        await answered(rejection(coordinator.run_timeouts(), ErrorCode.STORE_UNAVAILABLE))
        # Later passes that need the session are answered too.
        await answered(rejection(coordinator.record_activity(sid), ErrorCode.STORE_UNAVAILABLE))
        failing.heal()
        clock.advance(seconds=2)  # past the back-off after the failed pass
        await answered(coordinator.run_timeouts())
        session = await coordinator.get_workflow_session(sid)
        assert session is not None
        assert session.destroyed
        assert session.failure is not None
        assert session.failure.code is ErrorCode.INACTIVITY_TIMEOUT


async def test_a_log_read_failing_before_a_group_commit_strands_no_caller(
    store_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another coordinator appended to the shared log; reading it before the next
    group commit fails. The commands of that pass are refused (retryable) and nothing
    is stored: without the foreign events the writer could not know a retried
    command's id, and the projections could not follow what it saved."""
    async with SessionCoordinator(store_url, clock=clock, follow_interval=None) as coordinator:
        await coordinator.create_workflow_session()
        async with SessionCoordinator(store_url, clock=clock) as other:
            await other.create_workflow_session()
        before = stored_positions(coordinator)
        failing = FailingStore(coordinator, monkeypatch)
        failing.fail("max_position", "read")
        refused = await answered(
            rejection(coordinator.create_workflow_session(), ErrorCode.STORE_UNAVAILABLE)
        )
        assert refused.retryable
        assert stored_positions(coordinator) == before
        failing.heal()
        created = await answered(coordinator.create_workflow_session())
        assert created.status is S.INITIALIZING or created.status is S.ACTIVE
        assert len(coordinator.list_active_workflow_sessions()) == 3


async def test_a_log_read_failing_after_a_group_commit_strands_no_caller(
    store_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit is saved, but the projections must read the log to reach it (another
    coordinator wrote in between) and that read fails: the caller still gets its
    answer (the command is stored), and the projections catch up later."""
    async with SessionCoordinator(
        store_url, clock=clock, follow_log=False, follow_interval=None
    ) as coordinator:
        await coordinator.create_workflow_session()
        async with SessionCoordinator(store_url, clock=clock) as other:
            await other.create_workflow_session()
        before = stored_positions(coordinator)
        failing = FailingStore(coordinator, monkeypatch)
        failing.fail("read")
        request = CommandRequest(
            command_id=new_id(), issued_at=clock.now(), command=CreateWorkflowSession()
        )
        reply = await answered(coordinator.execute(request))
        assert reply.error is None
        assert isinstance(reply.result, Accepted)
        assert stored_positions(coordinator) > before
        failing.heal()
        # The next commit reads the log up to itself, the missed events with it.
        await answered(coordinator.create_workflow_session())
        assert len(coordinator.list_active_workflow_sessions()) == 4


async def test_an_unreachable_store_is_not_waited_on_by_every_pass(
    coordinator: SessionCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a pass found the store unreachable (its own connection retries take
    seconds), later passes are refused at once without touching the store, so the
    callers queued behind hear STORE_UNAVAILABLE before their own timeouts; a probe
    asks the store meanwhile, and writes resume by themselves when it answers."""
    sid = (await coordinator.create_workflow_session()).session_id
    failing = FailingStore(coordinator, monkeypatch)
    failing.delay = 1.2
    failing.fail()
    await answered(
        rejection(coordinator.update_session_status(sid, S.PAUSED), ErrorCode.STORE_UNAVAILABLE)
    )
    tried = failing.writer_calls
    assert tried >= 1
    for _ in range(3):
        refused = await answered(
            rejection(coordinator.create_workflow_session(), ErrorCode.STORE_UNAVAILABLE)
        )
        assert refused.details == {"reason": "unreachable"}
    assert failing.writer_calls == tried, "a pass waited on the unreachable store again"
    failing.heal()
    # Refused (retryably) until the probe has seen the store answer, then applied.
    codes: list[ErrorCode] = []
    for _ in range(100):
        try:
            accepted = await answered(coordinator.update_session_status(sid, S.PAUSED))
            break
        except CommandRejected as exc:
            codes.append(exc.code)
            await asyncio.sleep(0.1)
    else:
        pytest.fail("writes did not resume after the store came back")
    assert set(codes) <= {ErrorCode.STORE_UNAVAILABLE}
    assert accepted == Accepted(session_id=sid, version=3, events=1)


async def test_an_unforeseen_writer_error_strands_no_caller(
    coordinator: SessionCoordinator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error nobody mapped, raised in the middle of a pass, is answered INTERNAL
    (logged with its traceback) and the writer goes on with the next pass."""
    sid = (await coordinator.create_workflow_session()).session_id
    failing = FailingStore(coordinator, monkeypatch)
    failing.error = RuntimeError("a bug in the store adapter")
    failing.fail("save")
    with caplog.at_level(logging.ERROR, "sessionbus.coordinator.writer"):
        await answered(
            rejection(coordinator.update_session_status(sid, S.PAUSED), ErrorCode.INTERNAL)
        )
    assert any("writer pass" in r.getMessage() and r.exc_info for r in caplog.records)
    failing.heal()
    accepted = await answered(coordinator.update_session_status(sid, S.PAUSED))
    assert accepted == Accepted(session_id=sid, version=3, events=1)


async def test_reads_that_need_the_store_say_it_is_unavailable(
    coordinator: SessionCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A history read while the store is away is answered STORE_UNAVAILABLE
    (retryable) on the bus entry point, not left hanging or turned into INTERNAL."""
    sid = (await coordinator.create_workflow_session()).session_id
    failing = FailingStore(coordinator, monkeypatch)
    failing.fail("history")
    request = CommandRequest(
        command_id=new_id(),
        issued_at=coordinator.clock.now(),
        command=GetSessionHistory(session_id=sid),
    )
    reply = await answered(coordinator.execute(request))
    assert reply.error is not None
    assert reply.error.code is ErrorCode.STORE_UNAVAILABLE
    assert reply.error.retryable


async def test_commands_submitted_as_the_writer_stops_are_answered(
    coordinator: SessionCoordinator,
) -> None:
    """A job that reaches a stopped writer is refused (retryable), never left waiting."""
    writer = coordinator._writer
    assert writer is not None
    writer.stop()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    writer.submit(WriteJob.barrier(future))
    with pytest.raises(CommandRejected) as info:
        await answered(future)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert info.value.retryable


async def test_a_full_disk_under_sqlite_is_a_typed_refusal_and_space_returning_heals_it(
    clock: ManualClock,
) -> None:
    """The real thing on a 2 MB tmpfs: once the disk is full every write is refused
    STORE_UNAVAILABLE with reason "full" (sqlite3's "database or disk is full" mapped
    to ``StoreFull`` at the store boundary), nothing is stored, reads still answer,
    and the same coordinator writes again once space returns."""
    with tmpfs("2m") as directory:
        url = f"sqlite:///{directory / 'events.sqlite'}"
        async with SessionCoordinator(url, clock=clock) as coordinator:
            sid = (await coordinator.create_workflow_session()).session_id
            filler = directory / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for chunk in (1 << 16, 1 << 9):
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(fd, b"\0" * chunk)
            finally:
                os.close(fd)
            before = stored_positions(coordinator)
            refused = await answered(
                rejection(coordinator.create_workflow_session(), ErrorCode.STORE_UNAVAILABLE)
            )
            assert refused.details == {"reason": "full"}
            assert stored_positions(coordinator) == before
            assert (await coordinator.get_session_history(sid)).events
            filler.unlink()
            await answered(coordinator.update_session_status(sid, S.PAUSED))
            assert stored_positions(coordinator) == before + 1


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A size-limited tmpfs on a fresh directory (the suite runs as root), unmounted
    afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="sessionbus-store-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        with contextlib.suppress(OSError):
            directory.rmdir()


async def test_a_store_on_a_read_only_file_system_is_refused_clearly_until_writable(
    clock: ManualClock, tmp_path: Path
) -> None:
    """A coordinator started on a read-only bind mount of its store fails at once with
    ``StoreReadOnly`` (SQLite alone says "unable to open database file"), not with a
    driver error; once the mount is writable again it starts and writes."""
    directory = tmp_path / "store"
    directory.mkdir()
    async with SessionCoordinator(f"sqlite:///{directory / 'events.sqlite'}", clock=clock) as c:
        sid = (await c.create_workflow_session()).session_id
    view = tmp_path / "view"
    view.mkdir()
    url = f"sqlite:///{view / 'events.sqlite'}"
    mount("--bind", str(directory), str(view))
    try:
        mount("-o", "remount,bind,ro", str(view))
        with pytest.raises(StoreReadOnly, match="read-only"):
            await answered(SessionCoordinator(url, clock=clock).start())
        mount("-o", "remount,bind,rw", str(view))
        async with SessionCoordinator(url, clock=clock) as coordinator:
            await answered(coordinator.update_session_status(sid, S.PAUSED))
            assert len(coordinator.list_active_workflow_sessions()) == 1
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)  # noqa: ASYNC221 - instant


def mount(*args: str) -> None:
    """``mount ARGS`` (the suite runs as root); instant, so not worth a thread."""
    subprocess.run(["mount", *args], check=True)
