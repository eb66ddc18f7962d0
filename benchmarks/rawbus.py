"""Raw broker baselines: what plain aio-pika (and eventsourcing) do on this machine.

No sessionbus code runs here: the broker is driven with aio-pika alone, bodies are
JSON encoded with msgspec, and the naive peer stores with eventsourcing alone.

- ``rawbus.publish``: confirmed, persistent publishes to a durable topic exchange bound
  to one durable quorum queue (events go the same way in sessionbus), pipelined in
  windows: a window's publishes are all sent, then their confirms awaited.
- ``rawbus.e2e``: the same publishes, consumed by a child process (prefetch, manual
  acks with ``multiple=True`` every few messages); first publish to last delivery.
- ``rawbus.rpc``: requests to a queue served by a child process, replies through
  direct reply-to, at 1 and at 64 in flight; a classic request queue with transient
  requests, and a quorum one as the coordinator's commands queue is.
- ``rawbus.fanout``: the floor under the coordinator's fan-out latency: confirmed
  publishes paced at a fixed rate into one, then seven, quorum queues, each consumed
  by a process of its own that acks every message; publish → callback latency.
- ``rawbus.naive_peer``: per command, save one eventsourcing event to SQLite, then
  publish it and await the confirm; one command after another.

Every queue and exchange is named ``bench-rawbus-<hex6>.…`` and deleted afterwards.
The ``*_cpu_us_per_*`` figures are CPU time of the client (or consumer) process per
message: on a shared machine the rates move with the load, those much less.

Children: ``python -m benchmarks.rawbus consume URL QUEUE COUNT PREFETCH ACK_EVERY
MAX_SECONDS`` prints ``ready``, then one JSON line per COUNT messages received;
``python -m benchmarks.rawbus stamps URL QUEUE COUNT PREFETCH MAX_SECONDS`` prints
``ready``, then one JSON line of latencies per COUNT messages; ``python -m
benchmarks.rawbus serve URL PREFETCH MAX_SECONDS QUEUE...`` prints ``ready`` and
answers requests. All exit when their stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from benchmarks.cpu import CpuMeter, cpu_figures
from benchmarks.pacing import open_loop
from benchmarks.registry import Context, Deadline, Figure, Trial, measurement, percentile

T = TypeVar("T")

ROOT = Path(__file__).absolute().parent.parent
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
EVENT_BYTES = 300  # an event as JSON, about what sessionbus publishes
REQUEST_BYTES = 200
WINDOW = 256  # publishes sent before their confirms are awaited
PREFETCH = 256
ACK_EVERY = 64  # the consumer acks with multiple=True this often
QUORUM = {"x-queue-type": "quorum"}
CLASSIC = {"x-queue-type": "classic"}
# Safety net only: the broker drops a queue left behind by a killed run after this.
QUEUE_EXPIRES_MS = 15 * 60 * 1000
EVENT_KEY = "session.status-changed"
INFLIGHTS = (1, 64)

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _note(fields: dict[str, Any], size: int) -> str:
    """Padding that brings ``fields`` as JSON to about ``size`` bytes (computed once
    per kind of body, so a body costs one encode)."""
    return "x" * max(0, size - len(_encode({**fields, "note": ""})))


def _event_fields(seq: int) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "type": EVENT_KEY,
        "version": seq,
        "occurred_at": datetime.now(UTC).isoformat(),
        "actor": "bench",
        "data": {"old_status": "INITIALIZING", "new_status": "ACTIVE"},
    }


def _request_fields(seq: int) -> dict[str, Any]:
    return {"command": "record-activity", "id": seq, "session_id": str(uuid.uuid4())}


def _reply_fields(asked: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "id": asked["id"], "session_id": asked["session_id"], "result": None}


EVENT_NOTE = _note(_event_fields(0), EVENT_BYTES)
REQUEST_NOTE = _note(_request_fields(0), REQUEST_BYTES)
REPLY_NOTE = _note(_reply_fields(_request_fields(0)), REQUEST_BYTES)


def _event(seq: int) -> bytes:
    return _encode({**_event_fields(seq), "note": EVENT_NOTE})


def _request(seq: int) -> bytes:
    return _encode({**_request_fields(seq), "note": REQUEST_NOTE})


def _reply(request: bytes) -> bytes:
    return _encode({**_reply_fields(_decode(request)), "note": REPLY_NOTE})


def _event_message(body: bytes, seq: int) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(seq),
        type=EVENT_KEY,
    )


def _clock() -> float:
    """CLOCK_MONOTONIC is one clock for every process on the machine, so a child's
    delivery times compare with the parent's publish times."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --- the parent side: event loop, broker objects, children, clean-up ---------------


class _Child:
    """A child process of this module, its stderr kept in a file to show on failure."""

    def __init__(self, what: str, process: asyncio.subprocess.Process, stderr: IO[bytes]) -> None:
        self.what = what
        self.process = process
        self.stderr = stderr

    @classmethod
    async def start(cls, what: str, workdir: Path, *args: str) -> _Child:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        stderr = (workdir / f"{what}.stderr").open("w+b")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.rawbus",
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=ROOT,
                env=env,
                limit=1 << 24,  # a line of latencies can be long
            )
        except BaseException:
            stderr.close()
            raise
        return cls(what, process, stderr)

    def stderr_tail(self, chars: int = 2000) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-chars:]

    async def line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"{self.what}: nothing in {timeout:.0f}s; stderr: {self.stderr_tail()}"
            ) from None
        if not raw:
            code = await asyncio.wait_for(self.process.wait(), 5)
            raise RuntimeError(f"{self.what} exited ({code}); stderr: {self.stderr_tail()}")
        return raw.decode().strip()

    async def report(self, timeout: float) -> dict[str, Any]:
        """Its next JSON report; if none comes within ``timeout`` (a host that cannot
        carry the rate), it is asked for what it has so far (SIGUSR1), marked partial."""
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            self.process.send_signal(signal.SIGUSR1)
            return {**json.loads(await self.line(10)), "partial": True}
        if not raw:
            code = await asyncio.wait_for(self.process.wait(), 5)
            raise RuntimeError(f"{self.what} exited ({code}); stderr: {self.stderr_tail()}")
        return dict(json.loads(raw))

    async def exited(self, within: float) -> int | None:
        """Its exit code if it ends within ``within`` seconds, else ``None``."""
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            return None

    async def stop(self) -> None:
        """Close its stdin (it exits by itself), then terminate, then kill."""
        try:
            if self.process.returncode is None:
                assert self.process.stdin is not None
                self.process.stdin.close()
                for signal_it in (None, self.process.terminate, self.process.kill):
                    if signal_it is not None:
                        with contextlib.suppress(ProcessLookupError):
                            signal_it()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.process.wait(), 5)
                        break
        finally:
            self.stderr.close()


class _Bench:
    """One measurement's event loop and broker connection, and what to remove after:
    every queue and exchange is under a fresh ``bench-rawbus-<hex6>`` prefix."""

    def __init__(self, ctx: Context, kind: str) -> None:
        self.ctx = ctx
        self.url = ctx.amqp_url
        self.prefix = f"bench-rawbus-{secrets.token_hex(3)}"
        self.kind = kind
        self.workdir = ctx.tmpdir(f"rawbus-{kind}-")
        self.loop = asyncio.new_event_loop()
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.children: list[_Child] = []
        self._connection: AbstractConnection | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except Exception as exc:
            # A child that died is the likelier cause (a server gone shows here as a
            # request timeout): say so, with its stderr.
            for child in self.children:
                code = self.loop.run_until_complete(child.exited(0.5))
                if code is not None:
                    raise RuntimeError(
                        f"{child.what} exited ({code}); stderr: {child.stderr_tail()}"
                    ) from exc
            raise

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    async def connection(self) -> AbstractConnection:
        if self._connection is None:
            self._connection = await aio_pika.connect(
                self.url,
                timeout=10,
                client_properties={"connection_name": f"{self.prefix} {self.kind}"},
            )
        return self._connection

    async def queue(
        self, channel: AbstractChannel, suffix: str, arguments: dict[str, Any]
    ) -> AbstractQueue:
        name = self.name(suffix)
        self.queues.append(name)
        return await channel.declare_queue(
            name, durable=True, arguments={**arguments, "x-expires": QUEUE_EXPIRES_MS}
        )

    async def events(self, channel: AbstractChannel) -> tuple[AbstractExchange, AbstractQueue]:
        """A durable topic exchange bound to one durable quorum queue."""
        name = self.name("events")
        self.exchanges.append(name)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await self.queue(channel, "events.q", QUORUM)
        await queue.bind(exchange, "session.#")
        return exchange, queue

    async def child(self, what: str, *args: str) -> _Child:
        child = await _Child.start(what, self.workdir, *args)
        self.children.append(child)
        if (ready := await child.line(30)) != "ready":
            raise RuntimeError(f"{what}: expected 'ready', got {ready!r}")
        return child

    async def _clean(self) -> None:
        for child in self.children:
            await child.stop()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 10)
        if not (self.queues or self.exchanges):
            return
        # A fresh connection: the measuring one may be what failed.
        async with await aio_pika.connect(self.url, timeout=10) as connection:
            for name in self.queues:
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(name, timeout=10)
            for name in self.exchanges:
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.exchange_delete(name, timeout=10)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(asyncio.wait_for(self._clean(), 60))
        except Exception as exc:  # noqa: BLE001 - reported; the measurement's own error matters more
            self.ctx.note(f"clean-up of {self.prefix}.* failed: {type(exc).__name__}: {exc}")
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@contextlib.contextmanager
def _bench(ctx: Context, kind: str) -> Iterator[_Bench]:
    bench = _Bench(ctx, kind)
    # Other work on the machine takes cores from the client, the broker and the
    # children alike: keep how busy it was next to the figures.
    ctx.params.update(
        prefix=bench.prefix,
        amqp_url_host=_host(bench.url),
        load_average_at_setup=[round(x, 2) for x in os.getloadavg()],
    )
    try:
        yield bench
    finally:
        bench.close()


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}"


async def _publish_confirmed(
    exchange: AbstractExchange, bodies: list[bytes], deadline: Deadline, window: int = WINDOW
) -> int:
    """Publish ``bodies`` in windows of ``window``: a window's publishes are all sent,
    then their confirms awaited, then the next window. Stops early past the deadline.
    Returns how many were confirmed."""
    sent = 0
    count = len(bodies)
    while sent < count and not deadline.passed():
        batch = range(sent, min(sent + window, count))
        await asyncio.gather(
            *(exchange.publish(_event_message(bodies[i], i), EVENT_KEY) for i in batch)
        )
        sent = batch.stop
    return sent


def _bodies(ctx: Context, count: int, seconds: float) -> list[bytes]:
    """The event bodies to publish, encoded beforehand (this times the client and the
    broker, not JSON encoding), and the parameters every publishing baseline shares."""
    bodies = [_event(i) for i in range(count)]
    ctx.params.update(
        messages=count,
        max_seconds=seconds,
        window=WINDOW,
        body_bytes=len(bodies[0]),
        bodies="distinct, encoded before the timed part",
        exchange="topic, durable",
        queue="quorum, durable",
        delivery_mode="persistent",
    )
    return bodies


# --- rawbus.publish -----------------------------------------------------------------


@measurement(
    "rawbus.publish",
    "aio-pika alone: confirmed persistent publishes, windows of 256, topic exchange → quorum queue",
    repeats=(3, 5),
    budget_s=(15.0, 60.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def rawbus_publish(ctx: Context) -> Iterator[Trial]:
    count, seconds = ctx.size(5_000, 20_000), ctx.size(10, 30)
    bodies = _bodies(ctx, count, seconds)
    with _bench(ctx, "publish") as bench:

        async def setup() -> tuple[AbstractExchange, AbstractQueue]:
            channel = await (await bench.connection()).channel(publisher_confirms=True)
            return await bench.events(channel)

        exchange, queue = bench.run(setup(), 30)

        async def publish() -> dict[str, Figure]:
            await queue.purge(timeout=30)
            cpu = time.process_time()
            deadline = Deadline(seconds)
            sent = await _publish_confirmed(exchange, bodies, deadline)
            elapsed = deadline.elapsed()
            return {
                "msgs_per_s": Figure(sent / elapsed, "msgs/s"),
                # What the client costs, whatever else the machine is doing.
                "client_cpu_us_per_msg": Figure(
                    (time.process_time() - cpu) / sent * 1e6, "µs", None
                ),
            }

        def trial() -> dict[str, Figure]:
            return bench.run(publish(), seconds + 30)

        yield trial


# --- rawbus.e2e ---------------------------------------------------------------------


@measurement(
    "rawbus.e2e",
    "aio-pika alone: confirmed publishes consumed by another process (prefetch 256, acks)",
    repeats=(3, 5),
    budget_s=(15.0, 60.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def rawbus_e2e(ctx: Context) -> Iterator[Trial]:
    count, seconds = ctx.size(4_000, 20_000), ctx.size(10, 30)
    bodies = _bodies(ctx, count, seconds)
    ctx.params.update(prefetch=PREFETCH, ack_every=ACK_EVERY)
    with _bench(ctx, "e2e") as bench:

        async def setup() -> tuple[AbstractExchange, _Child]:
            channel = await (await bench.connection()).channel(publisher_confirms=True)
            exchange, queue = await bench.events(channel)
            child = await bench.child(
                "consumer",
                "consume",
                bench.url,
                queue.name,
                str(count),
                str(PREFETCH),
                str(ACK_EVERY),
                "900",
            )
            return exchange, child

        exchange, consumer = bench.run(setup(), 60)

        async def round_trip() -> dict[str, Figure]:
            started = _clock()
            sent = await _publish_confirmed(exchange, bodies, Deadline(seconds))
            published = _clock()
            if sent < count:
                raise RuntimeError(f"published {sent} of {count} in {seconds}s")
            got = json.loads(await consumer.line(seconds + 30))
            if got["count"] != count:
                raise RuntimeError(f"consumer reports {got}")
            return {
                "msgs_per_s": Figure(count / (got["last"] - started), "msgs/s"),
                "consumer_msgs_per_s": Figure((count - 1) / (got["last"] - got["first"]), "msgs/s"),
                "publish_msgs_per_s": Figure(count / (published - started), "msgs/s"),
                "consumer_cpu_us_per_msg": Figure(got["cpu"] / (count - 1) * 1e6, "µs", None),
            }

        def trial() -> dict[str, Figure]:
            return bench.run(round_trip(), 2 * seconds + 60)

        yield trial


# --- rawbus.rpc ---------------------------------------------------------------------


class _RpcClient:
    """Requests over one channel that consumes direct reply-to (it must be the
    channel the requests leave on)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.ids = itertools.count()

    async def start(self) -> None:
        replies = await self.channel.declare_queue(DIRECT_REPLY_TO, passive=True)

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = self.waiting.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await replies.consume(on_reply, no_ack=True)

    async def call(self, queue: str, timeout: float = 10.0) -> bytes:
        seq = next(self.ids)
        correlation_id = str(seq)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[correlation_id] = future
        try:
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    _request(seq),
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                ),
                queue,
                mandatory=False,
            )
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(correlation_id, None)

    async def load(
        self, queue: str, inflight: int, seconds: float, max_requests: int
    ) -> tuple[list[float], float]:
        """``inflight`` lanes, each calling in a loop until the time or the count runs
        out. Returns the sorted latencies (s) and the elapsed time."""
        issued = itertools.count()
        latencies: list[float] = []
        deadline = Deadline(seconds)

        async def lane() -> None:
            while not deadline.passed() and next(issued) < max_requests:
                began = time.perf_counter()
                await self.call(queue)
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(lane() for _ in range(inflight)))
        elapsed = deadline.elapsed()
        latencies.sort()
        return latencies, elapsed


@measurement(
    "rawbus.rpc",
    "aio-pika alone: request/reply via direct reply-to to a server process, 1 and 64 in flight",
    repeats=(3, 5),
    budget_s=(20.0, 90.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def rawbus_rpc(ctx: Context) -> Iterator[Trial]:
    seconds = 0.8 if ctx.quick else 2.0
    max_requests = ctx.size(10_000, 50_000)
    warmup = 200
    ctx.params.update(
        seconds_per_case=seconds,
        max_requests_per_case=max_requests,
        warmup_requests=warmup,
        inflight=list(INFLIGHTS),
        server_prefetch=PREFETCH,
        server_acks="one per request, after the reply",
        request_bytes=len(_request(0)),
        reply_bytes=len(_reply(_request(0))),
        request_queues="classic (plain figures), quorum (quorum.*); durable",
        request_delivery_mode="transient (as sessionbus commands)",
        reply="direct reply-to, no confirms",
    )
    with _bench(ctx, "rpc") as bench:

        async def setup() -> tuple[_RpcClient, dict[str, str]]:
            connection = await bench.connection()
            admin = await connection.channel()
            queues = {
                "": (await bench.queue(admin, "requests.classic", CLASSIC)).name,
                "quorum.": (await bench.queue(admin, "requests.quorum", QUORUM)).name,
            }
            await admin.close()
            await bench.child("server", "serve", bench.url, str(PREFETCH), "900", *queues.values())
            client = _RpcClient(await connection.channel(publisher_confirms=False))
            await client.start()
            return client, queues

        client, queues = bench.run(setup(), 60)

        async def cases() -> dict[str, Figure]:
            figures: dict[str, Figure] = {}
            for label, queue in queues.items():
                await client.load(queue, 8, 10.0, warmup)
                for inflight in INFLIGHTS:
                    cpu = time.process_time()
                    latencies, elapsed = await client.load(queue, inflight, seconds, max_requests)
                    cpu = time.process_time() - cpu
                    key = f"{label}inflight_{inflight}"
                    figures[f"{key}.req_per_s"] = Figure(len(latencies) / elapsed, "req/s")
                    figures[f"{key}.p50_ms"] = Figure(
                        percentile(latencies, 0.5) * 1000, "ms", "lower"
                    )
                    figures[f"{key}.p99_ms"] = Figure(
                        percentile(latencies, 0.99) * 1000, "ms", "lower"
                    )
                    figures[f"{key}.client_cpu_us_per_req"] = Figure(
                        cpu / len(latencies) * 1e6, "µs", None
                    )
            return figures

        def trial() -> dict[str, Figure]:
            return bench.run(cases(), 4 * seconds + 120)

        yield trial


# --- rawbus.fanout ------------------------------------------------------------------


async def _paced_publish(
    exchange: AbstractExchange, bodies: list[bytes], rate: float, seconds: float, case: int = 0
) -> tuple[int, float]:
    """Publish ``bodies`` on an open-loop schedule (``benchmarks.pacing``), each
    confirmed in its own task, the publish time and the case number in headers.
    Returns (sent, seconds)."""

    async def one(i: int) -> None:
        message = _event_message(bodies[i], i)
        message.headers = {"sent": _clock(), "case": case}
        await exchange.publish(message, EVENT_KEY)

    schedule = await open_loop(len(bodies), rate, seconds, one)
    return schedule.sent, time.perf_counter() - schedule.started


@measurement(
    "rawbus.fanout",
    "aio-pika alone: publish → consume latency at a fixed rate into 1, then 7 quorum queues "
    "each consumed by its own process; unprefixed figures are the seven queues'",
    repeats=(1, 3),
    budget_s=(40.0, 150.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def rawbus_fanout(ctx: Context) -> Iterator[Trial]:
    rate = float(ctx.size(250, 1000))
    seconds = 3.0 if ctx.quick else 8.0
    count = int(rate * seconds)
    bodies = _bodies(ctx, count, seconds)
    ctx.params.update(
        target_msgs_per_s=rate,
        queues=[1, 7],
        prefetch=PREFETCH,
        consumer_acks="one per message, as it arrives",
        publisher="one confirmed publish per message, paced (open loop)",
        latency="publish (header stamped just before it) to the consumer's callback; "
        "CLOCK_MONOTONIC in both processes; every message in every queue",
    )
    with _bench(ctx, "fanout") as bench:

        async def setup() -> tuple[AbstractExchange, list[AbstractQueue], list[_Child]]:
            channel = await (await bench.connection()).channel(publisher_confirms=True)
            name = bench.name("events")
            bench.exchanges.append(name)
            exchange = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queues, consumers = [], []
            for index in range(7):
                queue = await bench.queue(channel, f"fanout.q{index}", QUORUM)
                queues.append(queue)
                consumers.append(
                    await bench.child(
                        f"consumer {index}",
                        "stamps",
                        bench.url,
                        queue.name,
                        str(count),
                        str(PREFETCH),
                        "900",
                    )
                )
            # Queue 0 bound now; the others join for the seven-queue case.
            await queues[0].bind(exchange, "session.#")
            return exchange, queues, consumers

        exchange, queues, consumers = bench.run(setup(), 120)
        cases = itertools.count(1)

        async def case(receivers: list[_Child]) -> dict[str, Figure]:
            meter = CpuMeter({"consumers": [c.process.pid for c in receivers]})
            sent, elapsed = await _paced_publish(exchange, bodies, rate, seconds, next(cases))
            # A host that cannot carry the rate is a finding, not a failure: after the
            # wait each consumer reports what it received, and the figures say so.
            reports = await asyncio.gather(*(c.report(seconds + 60) for c in receivers))
            cpu = meter.stop()
            latencies = sorted(ms for r in reports for ms in r["latencies_ms"])
            if not latencies:
                raise RuntimeError(f"sent {sent} of {count}; no consumer received any")
            received = sum(r["count"] for r in reports)
            if sent < count or any(r.get("partial") for r in reports):
                ctx.note(
                    f"rawbus.fanout saturated with {len(receivers)} queue(s): sent {sent} of "
                    f"{count}, consumers received {received} of {sent * len(receivers)} "
                    f"within {seconds + 60:.0f}s after publishing; latencies are of those"
                )
            return {
                "p50_ms": Figure(percentile(latencies, 0.5), "ms", "lower"),
                "p99_ms": Figure(percentile(latencies, 0.99), "ms", "lower"),
                "max_ms": Figure(latencies[-1], "ms", "lower"),
                "achieved_msgs_per_s": Figure(sent / elapsed, "msgs/s"),
                "delivered_fraction": Figure(received / max(1, sent * len(receivers)), "x"),
                **cpu_figures("", cpu, sent, "msg"),
            }

        async def both() -> dict[str, Figure]:
            one = await case(consumers[:1])
            for queue in queues[1:]:
                await queue.bind(exchange, "session.#")
            try:
                seven = await case(consumers)
            finally:
                for queue in queues[1:]:
                    await queue.unbind(exchange, "session.#")
            return {**{f"one_queue.{k}": v for k, v in one.items()}, **seven}

        def trial() -> dict[str, Figure]:
            return bench.run(both(), 4 * seconds + 180)

        yield trial


# --- rawbus.naive_peer --------------------------------------------------------------


class _Peer(Aggregate):
    """A plain eventsourcing aggregate: one event method, default transcoder."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "INITIALIZING"

    @event("StatusChanged")
    def change(self, new_status: str, reason: str) -> None:
        self.status = new_status


class _PeerApp(Application[uuid.UUID]):
    name = "naive_peer"


@measurement(
    "rawbus.naive_peer",
    "eventsourcing + aio-pika: save one event to SQLite, then publish it confirmed; sequential",
    repeats=(3, 5),
    budget_s=(15.0, 60.0),
    needs=("rabbitmq",),
)
@contextlib.contextmanager
def rawbus_naive_peer(ctx: Context) -> Iterator[Trial]:
    seconds = 1.5 if ctx.quick else 3.0
    max_commands = ctx.size(5_000, 50_000)
    ctx.params.update(
        seconds_per_trial=seconds,
        max_commands=max_commands,
        store="SQLite file, eventsourcing defaults (WAL, synchronous FULL)",
        events_per_command=1,
        exchange="topic, durable",
        queue="quorum, durable",
        delivery_mode="persistent",
    )
    with _bench(ctx, "naive-peer") as bench:

        async def setup() -> tuple[AbstractExchange, AbstractQueue]:
            channel = await (await bench.connection()).channel(publisher_confirms=True)
            return await bench.events(channel)

        exchange, queue = bench.run(setup(), 30)
        runs = itertools.count(1)

        async def commands(app: _PeerApp) -> tuple[list[float], float]:
            await queue.purge(timeout=30)
            peer = _Peer(name="bench")
            app.save(peer)
            latencies: list[float] = []
            deadline = Deadline(seconds)
            statuses = itertools.cycle(("ACTIVE", "PAUSED"))
            while len(latencies) < max_commands and not deadline.passed():
                began = time.perf_counter()
                old_status = peer.status
                peer.change(new_status=next(statuses), reason="a short reason for it")
                recorded = app.save(peer)
                for recording in recorded:
                    stored = recording.domain_event
                    body = _encode(
                        {
                            "event_id": str(uuid.uuid4()),
                            "session_id": str(stored.originator_id),
                            "type": EVENT_KEY,
                            "version": stored.originator_version,
                            "occurred_at": peer.modified_on.isoformat(),
                            "actor": "bench",
                            "data": {"old_status": old_status, "new_status": peer.status},
                            "note": EVENT_NOTE,
                        }
                    )
                    await exchange.publish(
                        _event_message(body, stored.originator_version), EVENT_KEY
                    )
                latencies.append(time.perf_counter() - began)
            elapsed = deadline.elapsed()
            latencies.sort()
            return latencies, elapsed

        def trial() -> dict[str, Figure]:
            app = _PeerApp(
                env={
                    "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                    "SQLITE_DBNAME": str(bench.workdir / f"peer-{next(runs)}.sqlite"),
                }
            )
            try:
                latencies, elapsed = bench.run(commands(app), seconds + 60)
            finally:
                app.close()
            return {
                "commands_per_s": Figure(len(latencies) / elapsed, "commands/s"),
                "p50_ms": Figure(percentile(latencies, 0.5) * 1000, "ms", "lower"),
                "p99_ms": Figure(percentile(latencies, 0.99) * 1000, "ms", "lower"),
            }

        yield trial


# --- the children -------------------------------------------------------------------


async def _until_stdin_closes(max_seconds: float) -> None:
    """The parent closes our stdin to stop us (or dies, which closes it too)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(), max_seconds)


async def _consume(
    url: str, queue_name: str, count: int, prefetch: int, ack_every: int, max_seconds: float
) -> None:
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        received = 0
        first = first_cpu = 0.0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal received, first, first_cpu
            now = _clock()
            received += 1
            if received == 1:
                first, first_cpu = now, time.process_time()
            if received % ack_every == 0 or received == count:
                await message.ack(multiple=True)
            if received == count:
                cpu = time.process_time() - first_cpu
                report = {"count": received, "first": first, "last": now, "cpu": cpu}
                print(json.dumps(report), flush=True)
                received = 0

        await queue.consume(on_message)
        print("ready", flush=True)
        await _until_stdin_closes(max_seconds)


async def _stamps(url: str, queue_name: str, count: int, prefetch: int, max_seconds: float) -> None:
    """Per message, the time since the publisher's ``sent`` header; one JSON line of
    them for every ``count`` messages of one case (the ``case`` header), or on SIGUSR1
    of what the current case has so far. Messages of a case already reported (the
    backlog of a saturated one) are acknowledged and not counted."""
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        latencies: list[float] = []
        first_cpu = 0.0
        current = reported = 0

        def report() -> None:
            nonlocal reported
            cpu = time.process_time() - first_cpu if latencies else 0.0
            print(json.dumps({"count": len(latencies), "latencies_ms": latencies, "cpu": cpu}))
            sys.stdout.flush()
            latencies.clear()
            reported = current

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal first_cpu, current
            now = _clock()
            await message.ack()
            case = message.headers.get("case", 0)
            assert isinstance(case, int), message.headers
            if case <= reported:
                return
            if case != current:
                current = case
                latencies.clear()
            if not latencies:
                first_cpu = time.process_time()
            sent = message.headers.get("sent")
            assert isinstance(sent, float), message.headers
            latencies.append((now - sent) * 1000)
            if len(latencies) == count:
                report()

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report)
        await queue.consume(on_message)
        print("ready", flush=True)
        await _until_stdin_closes(max_seconds)


async def _serve(url: str, prefetch: int, max_seconds: float, queue_names: list[str]) -> None:
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        exchange = channel.default_exchange

        async def on_request(message: AbstractIncomingMessage) -> None:
            await exchange.publish(
                aio_pika.Message(
                    _reply(message.body),
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                ),
                message.reply_to or "",
                mandatory=False,
            )
            await message.ack()

        for name in queue_names:
            queue = await channel.declare_queue(name, passive=True)
            await queue.consume(on_request)
        print("ready", flush=True)
        await _until_stdin_closes(max_seconds)


def _main(argv: list[str]) -> None:
    match argv:
        case ["consume", url, queue, count, prefetch, ack_every, max_seconds]:
            asyncio.run(
                _consume(url, queue, int(count), int(prefetch), int(ack_every), float(max_seconds))
            )
        case ["stamps", url, queue, count, prefetch, max_seconds]:
            asyncio.run(_stamps(url, queue, int(count), int(prefetch), float(max_seconds)))
        case ["serve", url, prefetch, max_seconds, *queues] if queues:
            asyncio.run(_serve(url, int(prefetch), float(max_seconds), queues))
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    _main(sys.argv[1:])
