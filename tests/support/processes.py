"""Child processes for the multi-process tests: ``sessionctl coordinator`` and module
processes, started, watched for their ready line, stopped gracefully or killed.

Output is collected as it comes (so a child never blocks on a full pipe) and kept for
the failure message of a test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SESSIONCTL",
    "Child",
    "CtlResult",
    "coordinator_argv",
    "journal_module_argv",
    "run_sessionctl",
]

ROOT = Path(__file__).resolve().parents[2]
SESSIONCTL = str(Path(sys.executable).with_name("sessionctl"))


def coordinator_argv(url: str, store: str, prefix: str, identity: str = "guest=*") -> list[str]:
    """``sessionctl coordinator`` on ``store`` under ``prefix``."""
    return [
        SESSIONCTL,
        "coordinator",
        "--amqp-url",
        url,
        "--store",
        store,
        "--prefix",
        prefix,
        "--identity",
        identity,
    ]


def journal_module_argv(
    module_id: str, url: str, prefix: str, journal: Path, *, optional: bool = False
) -> list[str]:
    """``python -m tests.support.journal_module`` for ``module_id``."""
    argv = [
        sys.executable,
        "-m",
        "tests.support.journal_module",
        "--module-id",
        module_id,
        "--prefix",
        prefix,
        "--url",
        url,
        "--journal",
        str(journal),
    ]
    if optional:
        argv.append("--optional")
    return argv


class Child:
    """One child process. ``start`` waits (bounded) for a line containing ``ready``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = dict(env or {})
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._pumps: list[asyncio.Task[None]] = []
        self.starts = 0
        self.ready_at: float | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines[-200:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, *, ready: str = "ready", timeout: float = 60.0) -> Child:
        """Spawn the process and wait until it prints ``ready`` (or fails)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
        env.update({"SESSIONBUS_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
        env["SESSIONBUS_CONNECTION_NAME"] = f"sessionbus fault test {self.name}"
        env.update(self.env)
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.starts += 1
        mark = len(self.lines)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout)),
            asyncio.create_task(self._pump(self.proc.stderr)),
        ]
        deadline = time.monotonic() + timeout
        while not any(ready in line for line in self.lines[mark:]):
            if self.proc.returncode is not None:
                await asyncio.gather(*self._pumps)
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                    f"{self.output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready within {timeout} s:\n{self.output}")
            await asyncio.sleep(0.02)
        self.ready_at = time.monotonic()
        return self

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line.decode(errors="replace"))

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (bounded wait; SIGKILL after the timeout)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(
                f"{self.name} did not stop within {timeout} s:\n{self.output}"
            ) from None
        await asyncio.gather(*self._pumps)
        return code

    async def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
            await asyncio.gather(*self._pumps)

    def kill_now(self) -> None:
        """SIGKILL without waiting (clean-up in ``finally``)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


@dataclass(frozen=True)
class CtlResult:
    code: int
    out: str
    err: str


async def run_sessionctl(
    *args: str,
    prefix: str | None = None,
    url: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> CtlResult:
    """``sessionctl ARGS`` in its own process, as a user runs it: without SESSIONBUS_*
    from this one, then with the given prefix, broker URL and variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
    environment["COLUMNS"] = "200"
    if prefix is not None:
        environment["SESSIONBUS_PREFIX"] = prefix
    if url is not None:
        environment["SESSIONBUS_AMQP_URL"] = url
    environment.update(env or {})
    process = await asyncio.create_subprocess_exec(
        SESSIONCTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise
    assert process.returncode is not None
    return CtlResult(process.returncode, out.decode(), err.decode())
