"""The web console over the real broker: its pages with many live sessions, and its live
feed at a fixed event rate.

Both run a ``sessionctl coordinator`` process and a ``sessionctl console`` process on a
prefix of their own (``benchmarks.bus.Harness``: deleted afterwards, on error too); this
process is the browser, an ``httpx`` client on 127.0.0.1 signed in as ``guest``, whom
the coordinator's identity rules make an operator (``--identity guest=*``).

- ``console.pages``: the store holds N live sessions (``benchmarks.workload.generate``,
  as ``memory.sessions`` writes them; 100k, quick 10k), brought to where a running
  coordinator keeps it (``as_running``), the coordinator starts on it (every session in its
  read models); then the sessions page (first page, a filtered page, a later keyset
  page) and one session's page, requested in turn, one request at a time. Two times
  each: the server's, from the console's ``Server-Timing`` (request arrived → response
  head, the coordinator's answers over the broker included), and the client's round
  trip on loopback (first byte sent → last byte read).
- ``console.live_feed``: ``record_activity`` paced at 1,000 events/s through the
  coordinator, once with no console running and once with the console open and an SSE
  client reading the sessions list's live stream (``/sessions/feed``), the order
  alternating from one trial to the next; the SSE client counts the events it gets and
  how late (event time → read here). The coordinator's slowdown is the ratio of the
  command latencies and rates with and without the console, within each trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from benchmarks.bus import AMQP, SESSIONCTL, Child, Harness, _harness, _spawn
from benchmarks.cpu import CpuMeter, cpu_figures
from benchmarks.pacing import open_loop
from benchmarks.registry import (
    Context,
    Deadline,
    Figure,
    Trial,
    measurement,
    percentile,
    target,
)
from benchmarks.workload import OPTIONAL, as_running, generate
from contracts import SessionStatus, Topology
from coordinator.store.eventstore import EventStore

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
NEXT_PAGE = re.compile(r'id="next-page" href="([^"]+)"')
ROW = re.compile(r'data-session-id="([0-9a-f-]{36})"')
SERVED = re.compile(r"console on (http://127\.0\.0\.1:\d+)/")
SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")
# Starting a coordinator on 100k sessions rebuilds its read models first.
BIG_START_TIMEOUT_S = 600.0


async def _console(h: Harness) -> tuple[Child, str]:
    """A ``sessionctl console`` process on the harness's prefix; its URL."""
    child = await _spawn(
        "console",
        [
            SESSIONCTL,
            "console",
            "--amqp-url",
            AMQP,
            "--prefix",
            h.prefix,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        "sessionbus console on",
    )
    h.children.append(child)
    h.started.append(child)
    await child.wait_ready()
    for line in child.lines:
        if found := SERVED.search(line):
            return child, found.group(1)
    raise RuntimeError(f"the console said no URL:\n{child.tail()}")


def _sign_in_token(form: httpx.Response) -> str:
    token = CSRF.search(form.text)
    if form.status_code != 200 or token is None:
        raise RuntimeError(f"no sign-in form ({form.status_code})")
    return html.unescape(token.group(1))


async def _signed_in(url: str) -> httpx.AsyncClient:
    """A client of the console signed in as ``guest`` (an operator here)."""
    http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0))
    try:
        token = _sign_in_token(await http.get("/login"))
        answer = await http.post(
            "/login", data={"user": "guest", "password": "guest", "csrf": token}
        )
    except BaseException:
        await http.aclose()
        raise
    if answer.status_code != 303:
        await http.aclose()
        raise RuntimeError(f"sign-in refused ({answer.status_code}): {answer.text[:500]}")
    return http


async def _get(http: httpx.AsyncClient, path: str) -> tuple[float, float, str]:
    """Seconds from sending the request to the last byte of the answer; seconds the
    server says the page took it (its ``Server-Timing``); the page."""
    started = time.perf_counter()
    answer = await http.get(path)
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"GET {path}: {answer.status_code}: {answer.text[:500]}")
    served = SERVER_TIMING.fullmatch(answer.headers.get("server-timing", ""))
    if served is None:
        raise RuntimeError(f"GET {path}: no Server-Timing: {answer.headers}")
    return elapsed, float(served.group(1)) / 1000, answer.text


# --- console.pages --------------------------------------------------------------------


@measurement(
    "console.pages",
    "console pages with N live sessions (sessions list: first, filtered, later keyset "
    "page; a session's page): loopback round trip, one request at a time",
    repeats=(2, 3),
    budget_s=(60.0, 240.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def console_pages(ctx: Context) -> Iterator[Trial]:
    count = ctx.size(10_000, 100_000)
    per_kind = ctx.size(30, 100)
    trial_seconds = 25.0 if ctx.quick else 70.0
    with _harness(ctx, "console-pages") as (loop, h):
        store = h.dir / "live.sqlite"
        ctx.log(f"writing {count:,} live sessions into {store}")
        with EventStore(f"sqlite:///{store}") as events:
            made = generate(events, sessions=count, may_end=False, activity=(1, 3), max_seconds=600)
            as_running(events, Topology(prefix=h.prefix))
        ctx.log(f"wrote {made.events:,} events in {made.seconds:.1f}s")
        module = OPTIONAL[0]
        paths: dict[str, str] = {
            "first_page": "/sessions",
            "filtered_page": f"/sessions?status={SessionStatus.ACTIVE.value}&module={module}",
        }

        async def setup() -> tuple[httpx.AsyncClient, list[str], float]:
            coordinator = await h.coordinator(store)
            started = time.perf_counter()
            await coordinator.wait_ready(BIG_START_TIMEOUT_S)
            start_seconds = time.perf_counter() - started
            _, url = await _console(h)
            http = await _signed_in(url)
            # The fifth page by the keyset cursor of "Next page", and the sessions shown
            # on the way (whose own pages are then requested in turn).
            ids: list[str] = []
            path = paths["first_page"]
            for _ in range(5):
                _, _, page = await _get(http, path)
                ids.extend(ROW.findall(page))
                following = NEXT_PAGE.search(page)
                if following is None:
                    raise RuntimeError(f"no next page after {path} with {count} sessions")
                path = html.unescape(following.group(1))
            paths["later_page"] = path
            # What the filtered page shows: a filter matching nothing would be cheap.
            _, _, filtered = await _get(http, paths["filtered_page"])
            ctx.params["filtered_page_rows"] = len(ROW.findall(filtered))
            if not ids:
                raise RuntimeError("no session rows on the sessions page")
            return http, list(dict.fromkeys(ids)), start_seconds

        http, ids, start_seconds = loop.run_until_complete(setup())
        ctx.params.update(
            sessions=made.sessions,
            live_sessions=made.live_sessions,
            events=made.events,
            generation_seconds=round(made.seconds, 2),
            coordinator_start_seconds=round(start_seconds, 2),
            requests_per_page_kind=per_kind,
            paths={
                k: v.split("after=")[0] + ("after=…" if "after=" in v else "")
                for k, v in paths.items()
            },
            session_pages=f"/sessions/<id> of {len(ids)} sessions of the first five pages, in turn",
            timing="<kind>: client round trip on 127.0.0.1 (httpx, keep-alive), request sent → "
            "last byte read; <kind>.server: the console's Server-Timing (request arrived → "
            "response head, the coordinator's answers included); one request at a time, "
            "the kinds interleaved",
            store_state="as a running coordinator keeps it: the generated events marked "
            "published, the module-session lookup complete (benchmarks.workload.as_running)",
            coordinator_query="for reference: the first page's query alone "
            "(CoordinatorClient.page_workflow_sessions from this process), no console",
            signed_in_as="guest (operator: --identity guest=*)",
            quick_note="quick: 10k live sessions, not the issue's 100k" if ctx.quick else "",
        )

        async def trial() -> dict[str, Figure]:
            pages = (*paths, "session_page")
            kinds = (*pages, *(f"{k}.server" for k in pages), "coordinator_query")
            times: dict[str, list[float]] = {k: [] for k in kinds}
            session_pages = [f"/sessions/{sid}" for sid in ids]
            deadline = Deadline(trial_seconds)
            for i in range(per_kind):
                if deadline.passed():
                    ctx.note(f"pages: stopped after {i} rounds at the {trial_seconds:.0f} s bound")
                    break
                for kind, path in [*paths.items(), ("session_page", session_pages[i % len(ids)])]:
                    elapsed, served, _ = await _get(http, path)
                    times[kind].append(elapsed)
                    times[f"{kind}.server"].append(served)
                started = time.perf_counter()
                await h.client.page_workflow_sessions(newest_first=True)
                times["coordinator_query"].append(time.perf_counter() - started)
            figures: dict[str, Figure] = {}
            for kind, got in times.items():
                got.sort()
                figures[f"{kind}.p50_ms"] = Figure(percentile(got, 0.5) * 1000, "ms", "lower")
                figures[f"{kind}.p99_ms"] = Figure(percentile(got, 0.99) * 1000, "ms", "lower")
            figures["requests"] = Figure(sum(len(times[k]) for k in pages), "requests", None)
            return figures

        try:
            yield lambda: loop.run_until_complete(trial())
        finally:
            loop.run_until_complete(http.aclose())


for _kind, _label in (
    ("first_page", "sessions page"),
    ("filtered_page", "filtered sessions page"),
    ("later_page", "later keyset page"),
    ("session_page", "a session's page"),
):
    target(
        f"console {_label} p99 at the server with 100k live sessions",
        "console.pages",
        f"{_kind}.server.p99_ms",
        "<=",
        100,
        "ms",
        at_size=("live_sessions", 100_000),
    )


# --- console.live_feed ----------------------------------------------------------------


@dataclass
class Feed:
    """What the SSE client read."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0  # session events of the paced commands
    missed: int = 0  # events the console said it dropped for this client
    lags: list[float] = field(default_factory=list)
    since: float = 0.0  # time.time(): events before this are not counted
    goal: int | None = None  # events published; ``caught_up`` is set once all arrived
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, published: int) -> None:
        self.goal = published
        if self.received >= published:
            self.caught_up.set()


async def _read_feed(http: httpx.AsyncClient, feed: Feed, max_seconds: float) -> None:
    deadline = Deadline(max_seconds)
    async with http.stream("GET", "/sessions/feed") as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"live feed: {answer.status_code}")
        event = ""
        async for line in answer.aiter_lines():
            if deadline.passed():
                return
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "ready":
                    feed.ready.set()
                elif event == "missed":
                    feed.missed += int(line[6:])
                elif event == "session":
                    item: dict[str, Any] = json.loads(line[6:])
                    at = datetime.fromisoformat(item["at"]).timestamp()
                    if at >= feed.since and item.get("type") != "WorkflowSessionCreated":
                        feed.received += 1
                        feed.lags.append(time.time() - at)
                        if feed.goal is not None and feed.received >= feed.goal:
                            feed.caught_up.set()


@dataclass
class Run:
    commands: int = 0
    failed: int = 0
    seconds: float = 0.0
    behind_s: float = 0.0
    latencies: list[float] = field(default_factory=list)


async def _paced(h: Harness, sessions: list[uuid.UUID], rate: float, seconds: float) -> Run:
    """``record_activity`` (one event each) round-robin on an open-loop schedule."""
    got = Run()

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            await h.client.record_activity(sessions[i % len(sessions)])
        except Exception:  # noqa: BLE001 - counted and reported
            got.failed += 1
            return
        got.latencies.append(time.perf_counter() - started)

    schedule = await open_loop(int(rate * seconds), rate, seconds, one)
    got.seconds = time.perf_counter() - schedule.started
    got.commands = len(got.latencies)
    got.failed += schedule.late
    got.behind_s = schedule.behind_s
    got.latencies.sort()
    return got


@measurement(
    "console.live_feed",
    "commands paced at 1,000 events/s with no console, then with the console and an SSE "
    "client on the sessions list's live stream (order alternating): feed kept up? "
    "coordinator slowed?",
    repeats=(2, 6),
    budget_s=(60.0, 300.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def console_live_feed(ctx: Context) -> Iterator[Trial]:
    rate = 1000.0
    seconds = 3.0 if ctx.quick else 8.0
    lanes = 32
    ctx.params.update(
        target_events_per_s=rate,
        seconds=seconds,
        sessions=lanes,
        command="record_activity round-robin over pre-created ACTIVE sessions, 1 event each",
        store="SQLite file (fresh directory), only the benchmark's sessions",
        console="a sessionctl console process (its default --nice 10), started for the half "
        "with the console and stopped after it; the SSE client, a process of its own as a "
        "browser would be (benchmarks.feed_reader, httpx), reads /sessions/feed",
        slowdown="per trial: command p50/p99 latency and commands/s with ÷ without "
        "(the two halves alternate which goes first)",
        saturated="when the host does not carry the rate (reached_fraction < 1), both "
        "halves queue behind the schedule: the latencies then include that wait, and "
        "rate_slowdown_pct (commands/s lost with the console) is the telling figure",
        lag="event's occurred_at (coordinator) → the SSE line read by the reader, time.time()",
    )
    with _harness(ctx, "console-feed") as (loop, h):

        async def setup() -> tuple[Child, list[uuid.UUID]]:
            coordinator = await h.coordinator(h.dir / "feed.sqlite")
            await coordinator.wait_ready()
            ids = await h.sessions(lanes)
            await _paced(h, ids, rate, 0.5)  # warm-up
            return coordinator, ids

        coordinator, ids = loop.run_until_complete(setup())
        trials = 0

        async def without() -> tuple[Run, Any]:
            meter = CpuMeter({"coordinator": [coordinator.pid]})
            run = await _paced(h, ids, rate, seconds)
            return run, meter.stop()

        async def with_console() -> tuple[Run, Any, Feed]:
            console, url = await _console(h)
            result = h.dir / f"feed-{uuid.uuid4().hex[:8]}.json"
            reader = await _spawn(
                "feed reader",
                [sys.executable, "-m", "benchmarks.feed_reader", url, str(result), "120"],
                "feed ready",
            )
            h.children.append(reader)
            try:
                await reader.wait_ready(30)
                meter = CpuMeter(
                    {
                        "coordinator": [coordinator.pid],
                        "console": [console.pid],
                        "reader": [reader.pid],
                    }
                )
                run = await _paced(h, ids, rate, seconds)
                use = meter.stop()
                deadline = Deadline(10)
                # The reader's count is a line of its output, read by ``Child``: polled.
                while reader.applied < run.commands and not deadline.passed():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            finally:
                await h.stop(reader, console)
            read = json.loads(await asyncio.to_thread(result.read_text))
            feed = Feed(received=read["received"], missed=read["missed"], lags=read["lags"])
            return run, use, feed

        async def trial() -> dict[str, Figure]:
            nonlocal trials
            trials += 1
            if trials % 2:
                base, base_cpu = await without()
                run, cpu, feed = await with_console()
            else:
                run, cpu, feed = await with_console()
                base, base_cpu = await without()
            figures: dict[str, Figure] = {}
            for label, r in (("without", base), ("with", run)):
                per_s = r.commands / r.seconds if r.seconds > 0 else 0.0
                if r.failed:
                    ctx.note(f"trial {trials} ({label} console): {r.failed} commands failed")
                if per_s < 0.95 * rate:
                    ctx.note(
                        f"trial {trials} ({label} console): {rate:.0f} events/s not reached: "
                        f"{per_s:.0f} events/s, sends up to {r.behind_s:.2f} s behind schedule"
                    )
                figures[f"{label}.commands_per_s"] = Figure(per_s, "cmd/s")
                figures[f"{label}.reached_fraction"] = Figure(per_s / rate, "fraction")
                figures[f"{label}.p50_ms"] = Figure(
                    percentile(r.latencies, 0.5) * 1000, "ms", "lower"
                )
                figures[f"{label}.p99_ms"] = Figure(
                    percentile(r.latencies, 0.99) * 1000, "ms", "lower"
                )
            figures |= cpu_figures("without.", base_cpu, base.commands, "command")
            figures |= cpu_figures("with.", cpu, run.commands, "command")

            def ratio(a: float, b: float) -> float:
                return a / b if b > 0 else float("nan")

            p99 = ratio(percentile(run.latencies, 0.99), percentile(base.latencies, 0.99))
            p50 = ratio(percentile(run.latencies, 0.5), percentile(base.latencies, 0.5))
            rate_ratio = ratio(run.commands / run.seconds, base.commands / base.seconds)
            feed.lags.sort()
            delivered = feed.received / run.commands if run.commands else 0.0
            if delivered < 1.0:
                ctx.note(
                    f"trial {trials}: the live feed delivered {feed.received} of {run.commands} "
                    f"events within 10 s of the last command ({feed.missed} reported missed)"
                )
            coordinator_cpu = ratio(
                figures["with.cpu_ms_per_command.coordinator"].value,
                figures["without.cpu_ms_per_command.coordinator"].value,
            )
            return figures | {
                "coordinator_cpu_ratio": Figure(coordinator_cpu, "x", "lower"),
                "p99_latency_ratio": Figure(p99, "x", "lower"),
                "p50_latency_ratio": Figure(p50, "x", "lower"),
                "commands_per_s_ratio": Figure(rate_ratio, "x"),
                "coordinator_slowdown_pct": Figure((p99 - 1) * 100, "%", "lower"),
                "rate_slowdown_pct": Figure((1 - rate_ratio) * 100, "%", "lower"),
                "feed.delivered_fraction": Figure(delivered, "fraction"),
                "feed.received": Figure(feed.received, "events", None),
                "feed.missed": Figure(feed.missed, "events", "lower"),
                "feed.lag_p50_ms": Figure(percentile(feed.lags, 0.5) * 1000, "ms", "lower"),
                "feed.lag_p99_ms": Figure(percentile(feed.lags, 0.99) * 1000, "ms", "lower"),
            }

        yield lambda: loop.run_until_complete(trial())


target(
    "console's live feed slows the coordinator's p99 by at most 5% at 1k events/s",
    "console.live_feed",
    "coordinator_slowdown_pct",
    "<=",
    5,
    "%",
)
target(
    "console's live feed keeps up at 1k events/s",
    "console.live_feed",
    "feed.delivered_fraction",
    ">=",
    1.0,
    "fraction",
)
