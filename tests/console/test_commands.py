"""The console as a person starts it: ``sessionctl console`` and ``sessionctl coordinator
--console-port``, each in its own process, answering over HTTP and stopping cleanly on
SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sessionctl.console.limits import SignInLimits
from tests.console.conftest import ConsoleSystem, csrf_of
from tests.support.processes import SESSIONCTL

pytestmark = pytest.mark.broker

SERVED = re.compile(r"console on (http://127\.0\.0\.1:\d+)/")


@dataclass
class Served:
    url: str
    process: asyncio.subprocess.Process
    said: list[str]

    async def stop(self) -> None:
        """SIGTERM, then check it stopped cleanly (exit 0, no traceback)."""
        assert self.process.stderr is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(self.process.stderr.read(), 60)).decode()
        code = await asyncio.wait_for(self.process.wait(), 60)
        assert code == 0, "".join(self.said) + rest
        assert "Traceback" not in rest


@asynccontextmanager
async def serving(*args: str, prefix: str, url: str) -> AsyncIterator[Served]:
    """Run ``sessionctl ARGS`` until it says it is ready; stop it at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
    env.update({"SESSIONBUS_PREFIX": prefix, "SESSIONBUS_AMQP_URL": url})
    process = await asyncio.create_subprocess_exec(
        SESSIONCTL, *args, stderr=asyncio.subprocess.PIPE, env=env
    )
    said: list[str] = []

    async def ready() -> str:
        assert process.stderr is not None
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"sessionctl ended before it was ready: {said}")
            said.append(line)
            found = SERVED.search(line)
            if found and "ready" in line:
                return found.group(1)

    try:
        served = Served(await asyncio.wait_for(ready(), 60), process, said)
        yield served
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    await served.stop()


async def sign_in(http: httpx.AsyncClient) -> None:
    form = await http.get("/login")
    answer = await http.post(
        "/login", data={"user": "guest", "password": "guest", "csrf": csrf_of(form.text)}
    )
    assert answer.status_code == 303


async def test_sessionctl_console_serves_the_sessions_of_a_running_coordinator(
    console: ConsoleSystem,
) -> None:
    session = await console.client.create_workflow_session(["x"])
    async with (
        serving("console", "--port", "0", prefix=console.prefix, url=console.url) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as http,
    ):
        await sign_in(http)
        page = await http.get("/sessions")
        assert page.status_code == 200
        assert f'data-session-id="{session.session_id}"' in page.text
        assert 'data-live="on"' in page.text
        # A viewer runs at a lower CPU priority than it was started with (--nice 10).
        assert os.getpriority(os.PRIO_PROCESS, served.process.pid) == min(19, os.nice(0) + 10)


async def test_sessionctl_console_nice_0_keeps_the_priority_it_was_started_with(
    console: ConsoleSystem,
) -> None:
    async with serving(
        "console", "--port", "0", "--nice", "0", prefix=console.prefix, url=console.url
    ) as served:
        assert os.getpriority(os.PRIO_PROCESS, served.process.pid) == os.nice(0)


async def test_the_coordinator_serves_the_console_with_console_port(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    """... and stops on SIGTERM while a page's live stream is open."""
    store = f"sqlite:///{tmp_path / 'events.sqlite'}"
    async with (
        serving(
            "coordinator", "--store", store, "--console-port", "0", prefix=prefix, url=amqp_url
        ) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as http,
    ):
        assert (await http.get("/sessions")).status_code == 303
        await sign_in(http)
        for path in ("/sessions", "/modules", "/overview", "/dead-letters"):
            answer = await http.get(path)
            assert answer.status_code == 200, (path, answer.text)
        async with http.stream("GET", "/sessions/feed") as stream:
            lines = stream.aiter_lines()
            while "event: ready" not in await asyncio.wait_for(anext(lines), 10):
                pass
            await served.stop()


async def test_sessionctl_console_takes_its_sign_in_limits_from_the_command_line(
    console: ConsoleSystem,
) -> None:
    """``--sign-in-failures 2``: the third attempt within the window is refused (429)
    without asking the broker, even with the right password."""
    async with (
        serving(
            "console",
            "--port",
            "0",
            "--sign-in-failures",
            "2",
            "--sign-in-lockout",
            "120",
            "--sign-in-max-lockout",
            "120",
            prefix=console.prefix,
            url=console.url,
        ) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as http,
    ):
        for _ in range(2):
            form = await http.get("/login")
            wrong = {"user": "guest", "password": "wrong", "csrf": csrf_of(form.text)}
            assert (await http.post("/login", data=wrong)).status_code == 401
        form = await http.get("/login")
        right = {"user": "guest", "password": "guest", "csrf": csrf_of(form.text)}
        refused = await http.post("/login", data=right)
        assert refused.status_code == 429
        assert 0 < int(refused.headers["retry-after"]) <= 120


def test_the_sign_in_options_say_the_defaults_the_console_uses() -> None:
    """The options' help names the defaults (the web stack is not imported to read
    them); they must be the console's own."""
    limits = SignInLimits()
    shown = subprocess.run(
        [SESSIONCTL, "console", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option, value in (
        ("--sign-in-failures", limits.failures),
        ("--sign-in-window", limits.window),
        ("--sign-in-lockout", limits.lockout),
        ("--sign-in-max-lockout", limits.max_lockout),
    ):
        # The option's own lines: up to the next line that starts another option.
        described = " ".join(shown.split(f"  {option} ", 1)[1].split("\n  --", 1)[0].split())
        assert f"[default: {value:g}]" in described, (option, described)
