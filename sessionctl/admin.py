"""What ``sessionctl`` does for operators and auditors, apart from printing it.

Queue figures come from the endpoints the operator configured (rabbitmq_prometheus,
the management API) and from passive declares otherwise; dead letters are read from
the dead-letter stream (never taken), and replayed or discarded by marking them
settled there; the audit export reads the store or the audit stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from contracts import (
    HEADERS,
    DecodeError,
    EventEnvelope,
    SessionHistory,
    Topology,
    codec_for,
    fold_history,
)
from contracts.topology import DLQ_HEADERS
from coordinator.store.eventstore import EventStore
from transport.port import Delivery, OutgoingMessage, ResourceLocked, Transport

__all__ = [
    "DeadLetter",
    "QueueInfo",
    "StreamSpan",
    "audit_stream_span",
    "browse_dead_letters",
    "dead_letter",
    "discard_dead_letters",
    "export_from_store",
    "history_as_of",
    "list_queues",
    "move_dead_letters",
    "replay_dead_letters",
    "to_json_line",
    "unsettled_dead_letters",
]


@dataclass
class QueueInfo:
    name: str
    messages: int
    ready: int | None = None
    unacked: int | None = None
    consumers: int = 0
    publish_rate: float | None = None
    deliver_rate: float | None = None
    kind: str | None = None
    source: str = "management"


def _with_credentials(url: str, amqp_url: str) -> str:
    """``url`` with the AMQP URL's user and password where it names none."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:
        return url
    amqp = urllib.parse.urlsplit(amqp_url)
    user = urllib.parse.quote(urllib.parse.unquote(amqp.username or "guest"), safe="")
    password = urllib.parse.quote(urllib.parse.unquote(amqp.password or "guest"), safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc}"))


def _vhost(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _http_get(base: str, path: str, query: list[tuple[str, str]] | None = None) -> bytes:
    parts = urllib.parse.urlsplit(base)
    netloc = parts.hostname or "localhost"
    if parts.port:
        netloc += f":{parts.port}"
    root = parts.path.rstrip("/")
    url = urllib.parse.urlunsplit(
        (parts.scheme, netloc, root + path, urllib.parse.urlencode(query or []), "")
    )
    request = urllib.request.Request(url)  # noqa: S310 - the operator's own broker
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        auth = f"{user}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        body: bytes = response.read()
        return body


def _management_rows(base: str, vhost: str) -> list[dict[str, Any]]:
    rows = json.loads(_http_get(base, f"/api/queues/{urllib.parse.quote(vhost, safe='')}"))
    return [row for row in rows if isinstance(row, dict)]


# Per-queue metric families of rabbitmq_prometheus's /metrics/detailed endpoint.
_FAMILIES = (
    "queue_coarse_metrics",
    "queue_consumer_count",
    "queue_exchange_metrics",
    "queue_delivery_metrics",
)
_GAUGES = {
    "rabbitmq_detailed_queue_messages": "messages",
    "rabbitmq_detailed_queue_messages_ready": "ready",
    "rabbitmq_detailed_queue_messages_unacked": "unacked",
    "rabbitmq_detailed_queue_consumers": "consumers",
}
# Counters whose growth is a queue's incoming and outgoing rate (summed per queue).
_PUBLISHED = {"rabbitmq_detailed_queue_exchange_messages_published"}
_DELIVERED = {
    "rabbitmq_detailed_queue_messages_delivered_ack",
    "rabbitmq_detailed_queue_messages_delivered",
    "rabbitmq_detailed_queue_get_ack",
    "rabbitmq_detailed_queue_get",
}


@dataclass
class _Scrape:
    at: float
    gauges: dict[str, dict[str, float]]  # queue -> field -> value
    published: dict[str, float]
    delivered: dict[str, float]


def _prometheus_scrape(base: str, vhost: str) -> _Scrape:
    query = [("vhost", vhost), *(("family", f) for f in _FAMILIES)]
    text = _http_get(base, "/metrics/detailed", query).decode()
    scrape = _Scrape(time.monotonic(), {}, {}, {})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            queue = sample.labels.get("queue")
            if queue is None:
                continue
            name = sample.name.removesuffix("_total")
            if sample.name in _GAUGES:
                scrape.gauges.setdefault(queue, {})[_GAUGES[sample.name]] = sample.value
            elif name in _PUBLISHED:
                scrape.published[queue] = scrape.published.get(queue, 0.0) + sample.value
            elif name in _DELIVERED:
                scrape.delivered[queue] = scrape.delivered.get(queue, 0.0) + sample.value
    return scrape


def _rate(before: dict[str, float], after: dict[str, float], queue: str, seconds: float) -> float:
    # A counter of a channel that closed in between drops out of the sum: never negative.
    return max(0.0, after.get(queue, 0.0) - before.get(queue, 0.0)) / seconds


async def list_queues(
    transport: Transport,
    topology: Topology,
    amqp_url: str,
    management_url: str | None,
    module_ids: list[str],
    *,
    prometheus_url: str | None = None,
    rate_window: float = 1.0,
) -> list[QueueInfo]:
    """Every sessionbus queue of ``topology``, from what the operator configured:

    - ``prometheus_url`` (rabbitmq_prometheus, where RabbitMQ 4 puts queue metrics):
      depth and consumers, and rates from two scrapes ``rate_window`` seconds apart;
    - ``management_url`` (the management API): the queue list with types, and on
      brokers that still collect them (3.x), depth, consumers and rates;
    - neither, or neither answering: passive declares of the names we know (depth and
      consumers).
    URLs without credentials get the AMQP URL's."""
    vhost = _vhost(amqp_url)
    found: dict[str, QueueInfo] = {}
    if management_url:
        try:
            rows = _management_rows(_with_credentials(management_url, amqp_url), vhost)
        except (urllib.error.URLError, OSError, ValueError):
            rows = []
        for row in rows:
            name = str(row.get("name", ""))
            if not name.startswith(topology.prefix + "."):
                continue
            stats = row.get("message_stats") or {}
            found[name] = QueueInfo(
                name=name,
                messages=int(row.get("messages") or 0),
                ready=_maybe_int(row.get("messages_ready")),
                unacked=_maybe_int(row.get("messages_unacknowledged")),
                consumers=int(row.get("consumers") or 0),
                publish_rate=(stats.get("publish_details") or {}).get("rate"),
                deliver_rate=(stats.get("deliver_get_details") or {}).get("rate"),
                kind=row.get("type"),
                source="management",
            )
    if prometheus_url:
        try:
            base = _with_credentials(prometheus_url, amqp_url)
            first = await asyncio.to_thread(_prometheus_scrape, base, vhost)
            await asyncio.sleep(rate_window)
            second = await asyncio.to_thread(_prometheus_scrape, base, vhost)
        except (urllib.error.URLError, OSError, ValueError):
            second = None
        if second is not None:
            seconds = max(second.at - first.at, 1e-3)
            for name, gauges in second.gauges.items():
                if not name.startswith(topology.prefix + "."):
                    continue
                info = found.setdefault(name, QueueInfo(name=name, messages=0))
                info.messages = int(gauges.get("messages", 0))
                info.ready = int(gauges.get("ready", 0))
                info.unacked = int(gauges.get("unacked", 0))
                info.consumers = int(gauges.get("consumers", 0))
                info.publish_rate = _rate(first.published, second.published, name, seconds)
                info.deliver_rate = _rate(first.delivered, second.delivered, name, seconds)
                info.source = "prometheus"
    names = [
        topology.commands_queue(),
        topology.dead_letter_queue,
        topology.dead_letter_stream,
        topology.unroutable_queue,
        topology.audit_stream,
        *(topology.module_queue(m) for m in module_ids),
    ]
    # Without figures from either endpoint (none configured, none answering, or a
    # RabbitMQ 4 management API that no longer collects them): passive declares.
    for name in names if not found else [n for n, q in found.items() if q.source == "management"]:
        if name in found and found[name].ready is not None:
            continue
        try:
            stats = await transport.queue_stats(name)
        except ResourceLocked:
            # An exclusive queue of another connection (a console's live feed, new
            # enough that the management API has no figures for it yet) refuses a
            # passive declare: its row stays as the management API listed it. A queue
            # known only by name has nothing else to show: that error is the answer.
            if name not in found:
                raise
            continue
        if stats is not None:
            info = found.setdefault(name, QueueInfo(name=name, messages=0))
            info.messages = stats.messages
            info.consumers = stats.consumers
            info.source = "passive declare" if info.kind is None else "management + declare"
    return sorted(found.values(), key=lambda q: q.name)


@dataclass
class StreamSpan:
    """What a stream holds: its first and last entries' offsets and times (``None``
    when it is empty)."""

    first_offset: int | None = None
    first_time: datetime | None = None
    last_offset: int | None = None
    last_time: datetime | None = None

    @property
    def entries(self) -> int | None:
        """Entries from the first to the last (a stream's offsets are consecutive)."""
        if self.first_offset is None or self.last_offset is None:
            return None
        return self.last_offset - self.first_offset + 1


async def _stream_edge(
    transport: Transport, queue: str, where: str, idle_seconds: float
) -> tuple[int, datetime | None] | None:
    """The offset and event time of the first entry of a stream (``where="first"``),
    or of its last one (``"last"``: the last chunk is read until it stays quiet for
    ``idle_seconds``, as the audit export reads to the end, and for 20 times that at
    most: under steady traffic the newest entry seen by then is the last)."""
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_delivery(delivery: Delivery) -> None:
        await inbox.put(delivery)

    handle = await transport.consume(
        queue, on_delivery, prefetch=500, arguments={"x-stream-offset": where}
    )
    found: Delivery | None = None
    deadline = time.monotonic() + 20 * idle_seconds
    try:
        while time.monotonic() < deadline:
            try:
                delivery = await asyncio.wait_for(inbox.get(), idle_seconds)
            except TimeoutError:
                break
            await delivery.ack()  # a stream's ack only grants credit
            found = delivery
            if where == "first":
                break
    finally:
        with contextlib.suppress(Exception):
            await handle.close()
    if found is None or "x-stream-offset" not in found.headers:
        return None
    try:
        at: datetime | None = codec_for(found.content_type).decode_envelope(found.body).occurred_at
    except DecodeError:
        at = None
    return int(found.headers["x-stream-offset"]), at


async def audit_stream_span(
    transport: Transport, topology: Topology, *, idle_seconds: float = 0.5
) -> StreamSpan:
    """The audit stream's first and last entries (offsets and event times), read from
    the broker without changing anything."""
    first = await _stream_edge(transport, topology.audit_stream, "first", idle_seconds)
    if first is None:
        return StreamSpan()
    last = await _stream_edge(transport, topology.audit_stream, "last", idle_seconds)
    span = StreamSpan(first_offset=first[0], first_time=first[1])
    if last is not None:
        span.last_offset, span.last_time = last
    return span


def _maybe_int(value: Any) -> int | None:
    return None if value is None else int(value)


# A read of the dead-letter stream waits this long, at most, for its own cut to come
# back (it is confirmed before the read starts, so only a stalled broker takes long).
_CUT_WAIT = 30.0
# Dead-letter stream entries read per credit window.
_READ_PREFETCH = 1000


@dataclass
class DeadLetter:
    message_id: str | None
    reason: str | None
    code: str | None
    reject_field: str | None
    rejected_by: str | None
    original_exchange: str | None
    original_routing_key: str | None
    content_type: str | None
    size: int
    body_preview: str
    headers: dict[str, Any] = field(default_factory=dict)
    offset: int | None = None  # its place in the dead-letter stream: its identity


def dead_letter(delivery: Delivery) -> DeadLetter:
    """What a dead letter says about itself: its reasons, origin and headers."""
    headers = dict(delivery.headers)
    preview = delivery.body[:200].decode("utf-8", errors="replace")
    offset = headers.get("x-stream-offset")
    return DeadLetter(
        message_id=delivery.message_id,
        reason=_text(headers.get(HEADERS.REJECT_REASON)),
        code=_text(headers.get(HEADERS.REJECT_CODE)),
        reject_field=_text(headers.get(HEADERS.REJECT_FIELD)),
        rejected_by=_text(headers.get(HEADERS.REJECTED_BY)),
        original_exchange=_text(headers.get("x-original-exchange")),
        original_routing_key=_text(headers.get("x-original-routing-key")) or delivery.routing_key,
        content_type=delivery.content_type,
        size=len(delivery.body),
        body_preview=preview,
        headers={
            k: _text(v) for k, v in headers.items() if k not in {"x-death", "x-stream-offset"}
        },
        offset=int(offset) if offset is not None else None,
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


async def _append(transport: Transport, topology: Topology, headers: dict[str, Any]) -> None:
    """One bookkeeping entry (a cut or a settlement) at the end of the dead-letter
    stream, confirmed."""
    await transport.publish(
        "",
        topology.dead_letter_stream,
        OutgoingMessage(
            b"", "application/octet-stream", headers=headers, message_id=uuid.uuid4().hex
        ),
        mandatory=True,
    )


def _origin(delivery: Delivery) -> dict[str, Any]:
    """Where a letter in the inbox came from: our own dead-lettering says so in
    headers; the broker's says so in the first ``x-death`` entry."""
    headers = delivery.headers
    if "x-original-routing-key" in headers:
        return {}
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        keys = deaths[0].get("routing-keys") or [delivery.routing_key]
        return {
            "x-original-exchange": _text(deaths[0].get("exchange")) or "",
            "x-original-routing-key": _text(keys[0]) or "",
        }
    return {
        "x-original-exchange": delivery.exchange,
        "x-original-routing-key": delivery.routing_key,
    }


async def move_dead_letters(transport: Transport, topology: Topology, limit: int = 100_000) -> int:
    """Move every letter from the dead-letter inbox (a quorum queue: where the broker
    can dead-letter on every version) to the dead-letter stream, unchanged but for
    where it came from, written into its headers. Each is acked only once the stream
    has confirmed it: a move that dies half-way leaves it in the inbox (whose delivery
    limit is far out of reach), or, past the confirm, in both places, never nowhere.
    Returns how many moved."""
    moved = 0
    while moved < limit:
        delivery = await transport.get(topology.dead_letter_queue)
        if delivery is None:
            break
        headers = {**delivery.headers, **_origin(delivery)}
        await transport.publish(
            "",
            topology.dead_letter_stream,
            delivery.to_outgoing(headers=headers, user_id=None),
            mandatory=True,
        )
        await delivery.ack()
        moved += 1
    return moved


async def unsettled_dead_letters(transport: Transport, topology: Topology) -> list[Delivery]:
    """The dead letters not yet replayed or discarded, oldest first, as of now (the
    inbox first moved to the stream).

    Dead letters are kept in a stream: reading it from the first offset takes nothing
    away and counts no delivery, so a letter stays exactly as it was however often it
    is listed. AMQP does not say where a stream ends, so the read first appends a cut
    entry (confirmed) and reads up to it; settlements are entries too (``settle``)."""
    await move_dead_letters(transport, topology)
    cut = uuid.uuid4().hex
    await _append(transport, topology, {DLQ_HEADERS.ENTRY: "cut", DLQ_HEADERS.CUT: cut})
    letters: dict[int, Delivery] = {}
    settled: set[int] = set()
    done = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        await delivery.ack()  # a stream's ack only grants credit; nothing is removed
        if done.is_set():
            return
        entry = _text(delivery.headers.get(DLQ_HEADERS.ENTRY))
        if entry is None:
            letters[int(delivery.headers["x-stream-offset"])] = delivery
        elif entry == "settled":
            settled.add(int(delivery.headers[DLQ_HEADERS.SETTLES]))
        elif entry == "cut" and _text(delivery.headers.get(DLQ_HEADERS.CUT)) == cut:
            done.set()

    handle = await transport.consume(
        topology.dead_letter_stream,
        on_delivery,
        prefetch=_READ_PREFETCH,
        arguments={"x-stream-offset": "first"},
    )
    try:
        await asyncio.wait_for(done.wait(), _CUT_WAIT)
    except TimeoutError:
        raise TimeoutError(
            f"{topology.dead_letter_stream}: the read did not reach its cut in {_CUT_WAIT} s"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await handle.close()
    return [letters[o] for o in sorted(letters) if o not in settled]


async def _settle(transport: Transport, topology: Topology, offset: int, action: str) -> None:
    await _append(
        transport,
        topology,
        {DLQ_HEADERS.ENTRY: "settled", DLQ_HEADERS.SETTLES: offset, DLQ_HEADERS.ACTION: action},
    )


def _selected(
    letter: DeadLetter,
    message_id: str | None,
    offset: int | None,
    offsets: Collection[int] | None = None,
) -> bool:
    if message_id is not None and letter.message_id != message_id:
        return False
    if offsets is not None and letter.offset not in offsets:
        return False
    return offset is None or letter.offset == offset


async def browse_dead_letters(
    transport: Transport, topology: Topology, limit: int = 1000
) -> list[DeadLetter]:
    """The first ``limit`` dead letters not yet replayed or discarded, oldest first.
    Nothing is taken, requeued or counted as a delivery: listing never changes them."""
    return [dead_letter(d) for d in (await unsettled_dead_letters(transport, topology))[:limit]]


async def replay_dead_letters(
    transport: Transport,
    topology: Topology,
    *,
    message_id: str | None = None,
    offset: int | None = None,
    offsets: Collection[int] | None = None,
    limit: int = 100_000,
) -> tuple[int, int]:
    """Publish dead letters back where they came from (after a fix), each then marked
    settled in the dead-letter stream; only the one with ``message_id`` / ``offset``
    when given, or those at ``offsets`` (a group). Letters dead-lettered again
    meanwhile come after the read's cut and are not replayed by the same run. A crash
    between the publish and the mark leaves the letter listed, and a second replay
    sends it again (the consumers dedupe). Returns (replayed, left)."""
    replayed = 0
    pending = await unsettled_dead_letters(transport, topology)
    for delivery in pending:
        letter = dead_letter(delivery)
        if replayed >= limit or not _selected(letter, message_id, offset, offsets):
            continue
        headers = {
            k: v
            for k, v in delivery.headers.items()
            if not k.startswith("x-sessionbus-reject")
            and k not in {"x-death", "x-stream-offset", HEADERS.REJECTED_BY}
        }
        exchange = letter.original_exchange or ""
        await transport.publish(
            exchange,
            letter.original_routing_key or "",
            delivery.to_outgoing(headers=headers),
            mandatory=exchange == "",
        )
        assert letter.offset is not None  # every stream delivery has one
        await _settle(transport, topology, letter.offset, "replayed")
        replayed += 1
    return replayed, len(pending) - replayed


async def discard_dead_letters(
    transport: Transport,
    topology: Topology,
    *,
    message_id: str | None = None,
    offset: int | None = None,
    offsets: Collection[int] | None = None,
) -> tuple[int, int]:
    """Mark dead letters settled without sending them anywhere (every one, or only
    the one with ``message_id`` / ``offset``, or those at ``offsets``). Returns
    (discarded, left)."""
    discarded = 0
    pending = [dead_letter(d) for d in await unsettled_dead_letters(transport, topology)]
    for letter in pending:
        if _selected(letter, message_id, offset, offsets) and letter.offset is not None:
            await _settle(transport, topology, letter.offset, "discarded")
            discarded += 1
    return discarded, len(pending) - discarded


def history_as_of(
    history: SessionHistory, *, version: int | None = None, as_of: datetime | None = None
) -> SessionHistory:
    """A session's events up to ``version`` and up to ``as_of`` (both when given), and
    the state they fold to: what ``sessions history --version/--as-of`` shows."""
    events = [
        e
        for e in history.events
        if (version is None or e.version <= version) and (as_of is None or e.occurred_at <= as_of)
    ]
    return SessionHistory(events=events, state=fold_history(events))


def export_from_store(
    store: EventStore,
    *,
    since: datetime | None = None,
    session_id: uuid.UUID | None = None,
) -> Iterator[EventEnvelope]:
    """Every stored event (with its position) in store order, filtered."""
    if session_id is not None:
        # One stream's history carries versions, not global positions.
        for env in store.history(session_id):
            if since is None or env.occurred_at >= since:
                yield env
        return
    for page in store.iter_all():
        for env in page:
            if since is None or env.occurred_at >= since:
                yield env


_jsonl = msgspec.json.Encoder()


def to_json_line(env: EventEnvelope) -> bytes:
    return _jsonl.encode(env) + b"\n"
