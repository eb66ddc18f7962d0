"""Scenarios 13-14: the SQLite store's disk fills up, or its file turns read-only, in
the middle of a load; then space returns, or the file is writable again.

``sessionctl coordinator`` and a journaling module as OS processes. Disk full: the
store lives on a small tmpfs of its own, filled to the last byte by a file that is
removed after the outage. Read-only: the database and its WAL are made immutable
(``chattr +i``), which refuses writes through the coordinator's open descriptors; a
``mount -o remount,ro`` is refused by the kernel (EBUSY) while the coordinator holds
the files open for writing, so it cannot make a running store read-only. Nobody is
told: every command in the outage is refused with a retryable STORE_UNAVAILABLE (the
load sends it again with the same command id), nothing unstored is acknowledged, and
once the store takes writes again commands succeed and the relay publishes what was
stored. Each row gives commands acknowledged and refused retryably, lost, applied
twice, spurious hooks, and the time from the store's return to the first answered
command and to the first event a module applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import ProcessSystem, end_load_after, wait_until
from tests.faults.report import Row, record, seconds
from tests.faults.sizes import sized
from tests.support.load import SessionLoad

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

MODULES = ("executor",)
SESSIONS = sized(24, 200)
RATE = sized(8.0, 15.0)
OUTAGE_SECONDS = sized(3.0, 8.0)
TMPFS_SIZE = "64m"


@dataclass
class SQLiteSystem(ProcessSystem):
    """A process system whose store lives in a directory of its own."""

    store_directory: Path = Path()

    @property
    def store(self) -> str:
        return f"sqlite:///{self.store_directory / 'coordinator.sqlite'}"

    @property
    def store_path(self) -> Path:
        return self.store_directory / "coordinator.sqlite"


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A size-limited tmpfs on a fresh directory, unmounted afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="sessionbus-store-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        # Lazily: a process the test failed to stop may still hold a file there.
        subprocess.run(["umount", "-l", str(directory)], check=False)
        with contextlib.suppress(OSError):
            directory.rmdir()


def fill(directory: Path) -> Path:
    """Write a file until the file system has not one block left; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def immutable(paths: list[Path], on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], check=True)


@contextlib.asynccontextmanager
async def sqlite_system(
    url: str, prefix: str, directory: Path, store_directory: Path
) -> AsyncIterator[SQLiteSystem]:
    system = SQLiteSystem(url, prefix, directory, MODULES, store_directory=store_directory)
    try:
        await system.start()
        yield system
    finally:
        await system.aclose()


def _disk_full(system: SQLiteSystem) -> tuple[Callable[[], None], Callable[[], None]]:
    filler: list[Path] = []

    def strike() -> None:
        filler.append(fill(system.store_directory))

    def heal() -> None:
        while filler:
            filler.pop().unlink()

    return strike, heal


def _read_only(system: SQLiteSystem) -> tuple[Callable[[], None], Callable[[], None]]:
    # Not the -shm file: SQLite maps it, and a write to an immutable mapping is a
    # SIGBUS, not an error; a store whose log and database refuse writes is read-only.
    files = [system.store_path, Path(f"{system.store_path}-wal")]

    def strike() -> None:
        immutable(files, on=True)

    def heal() -> None:
        if all(f.exists() for f in files):
            immutable(files, on=False)

    return strike, heal


@pytest.mark.timeout(sized(150, 400))
@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
async def test_the_sqlite_store_refusing_writes_mid_load_loses_and_duplicates_nothing(
    fault: str, amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if fault == "disk-full":
            store_directory = stack.enter_context(tmpfs(TMPFS_SIZE))
            name, make = "SQLite disk full", _disk_full
        else:
            store_directory = tmp_path / "store"
            store_directory.mkdir()
            name, make = "SQLite files read-only (immutable)", _read_only
        async with sqlite_system(amqp_url, prefix, tmp_path, store_directory) as system:
            strike, heal = make(system)
            healed = False

            def heal_once() -> None:
                nonlocal healed
                if not healed:
                    healed = True
                    heal()

            # Whatever fails below, the store is given back (immutable files would
            # outlive the test otherwise).
            stack.callback(heal_once)
            load = SessionLoad(
                system.client,
                sessions=SESSIONS,
                rate=RATE,
                deadline=sized(100, 300),
                until=asyncio.Event(),
            )
            running = asyncio.create_task(load.run())
            await wait_until(
                lambda: load.created >= SESSIONS // 3, timeout=60, what="the load to progress"
            )
            assert not running.done(), "the fault came after the load, not in the middle"
            began = time.monotonic()
            await asyncio.to_thread(strike)
            # Counted from the moment the store is full (filling takes a while); a
            # write may still fit in space SQLite already holds (its WAL).
            acknowledged_before = load.result.commands
            await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself, not a wait for a result
            refused_in_outage = load.result.refused_retryable
            acknowledged_in_outage = load.result.commands - acknowledged_before
            await asyncio.to_thread(heal_once)
            back = time.monotonic()
            result = await end_load_after(load, running, back)
            assert result.failures == [], result.failures[:10]
            assert len(result.finished) == len(result.sessions) >= SESSIONS
            assert refused_in_outage > 0, "no command was refused: the fault did not strike"

            await system.settle()
            await system.stop()
            report, _ = await system.check(result.sessions)
            coordinator = system.coordinator.output if system.coordinator else ""
            try:
                report.assert_ok()
            except AssertionError as exc:
                raise AssertionError(f"{exc}\ncoordinator:\n{coordinator}") from None
            answered = result.first_answer_after(back)
            resumed = system.resumed_after(back)
            assert answered is not None
            assert resumed is not None

    record(
        Row(
            scenario=f"{name} (1 coordinator)",
            load=f"{len(result.sessions)} sessions, {len(MODULES)} module: "
            f"{result.commands} commands acknowledged ({acknowledged_in_outage} while the "
            f"store refused), {result.refused_retryable} refused retryably, "
            f"{result.retries} resent",
            faults=f"1 x {fault} (store refusing writes {seconds([back - began])}); "
            f"{report.published_duplicates} published twice (absorbed)",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery=f"command {seconds([answered])}; module applied {seconds([resumed])}",
        )
    )
