"""What ``sessionctl`` does for operators and auditors, apart from printing it.

Queue figures come from the RabbitMQ management API when it answers and from passive
declares otherwise; dead letters are browsed and replayed with basic.get; the audit
export reads the store or the audit stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from contracts import HEADERS, EventEnvelope, Topology
from contracts.transport import Delivery, Transport
from coordinator.store import EventStore

__all__ = [
    "DeadLetter",
    "QueueInfo",
    "browse_dead_letters",
    "export_from_store",
    "list_queues",
    "management_url_for",
    "replay_dead_letters",
    "to_json_line",
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


def management_url_for(amqp_url: str, explicit: str | None = None) -> str:
    """The management API of the broker an AMQP URL points at (port 15672, same
    credentials), unless given."""
    if explicit:
        return explicit
    parts = urllib.parse.urlsplit(amqp_url)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    host = parts.hostname or "localhost"
    scheme = "https" if parts.scheme == "amqps" else "http"
    netloc = f"{urllib.parse.quote(user)}:{urllib.parse.quote(password)}@{host}:15672"
    return f"{scheme}://{netloc}/"


def _vhost(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _management_get(base: str, path: str) -> Any:
    parts = urllib.parse.urlsplit(base)
    netloc = parts.hostname or "localhost"
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
    request = urllib.request.Request(url)  # noqa: S310 - the operator's own broker
    user = urllib.parse.unquote(parts.username or "guest")
    auth = f"{user}:{urllib.parse.unquote(parts.password or 'guest')}"
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.loads(response.read())


async def list_queues(
    transport: Transport,
    topology: Topology,
    amqp_url: str,
    management_url: str | None,
    module_ids: list[str],
) -> list[QueueInfo]:
    """Every sessionbus queue of ``topology``: from the management API, or (when it
    does not answer) by passive declares of the names we know."""
    base = management_url_for(amqp_url, management_url)
    vhost = urllib.parse.quote(_vhost(amqp_url), safe="")
    try:
        rows = _management_get(base, f"/api/queues/{vhost}")
    except (urllib.error.URLError, OSError, ValueError):
        rows = None
    if rows is not None:
        out = []
        for row in rows:
            name = row.get("name", "")
            if not name.startswith(topology.prefix + "."):
                continue
            stats = row.get("message_stats") or {}
            out.append(
                QueueInfo(
                    name=name,
                    messages=int(row.get("messages") or 0),
                    ready=int(row.get("messages_ready") or 0),
                    unacked=int(row.get("messages_unacknowledged") or 0),
                    consumers=int(row.get("consumers") or 0),
                    publish_rate=(stats.get("publish_details") or {}).get("rate"),
                    deliver_rate=(stats.get("deliver_get_details") or {}).get("rate"),
                    kind=row.get("type"),
                )
            )
        return sorted(out, key=lambda q: q.name)
    names = [
        topology.commands_queue(),
        topology.dead_letter_queue,
        topology.unroutable_queue,
        topology.audit_stream,
        *(topology.module_queue(m) for m in module_ids),
    ]
    out = []
    for name in names:
        stats = await transport.queue_stats(name)
        if stats is not None:
            out.append(
                QueueInfo(
                    name=name,
                    messages=stats.messages,
                    consumers=stats.consumers,
                    source="passive declare",
                )
            )
    return out


# Most dead letters one browse holds unsettled (AMQP's prefetch count is 16 bits).
_MAX_WINDOW = 65_535
# A browse stops waiting for more dead letters after this long without one.
_BROWSE_IDLE = 2.0


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


def _dead_letter(delivery: Delivery) -> DeadLetter:
    headers = dict(delivery.headers)
    preview = delivery.body[:200].decode("utf-8", errors="replace")
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
        headers={k: _text(v) for k, v in headers.items() if k != "x-death"},
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


async def browse_dead_letters(
    transport: Transport, topology: Topology, limit: int = 1000
) -> list[DeadLetter]:
    """Read dead letters without consuming them: received by one consumer (a window of
    at most ``limit`` unsettled deliveries, 65535 at most: AMQP's prefetch is 16 bits),
    then every one put back. (Taking each with basic.get would hold a channel per dead
    letter until the end, and the broker closes the connection past its channel_max,
    2047 by default.)"""
    queue = topology.dead_letter_queue
    stats = await transport.queue_stats(queue)
    want = min(limit, _MAX_WINDOW, stats.messages if stats is not None else 0)
    if want <= 0:
        return []
    received: list[Delivery] = []
    arrived = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        received.append(delivery)
        arrived.set()

    handle = await transport.consume(queue, on_delivery, prefetch=want)
    try:
        while len(received) < want:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), _BROWSE_IDLE)
            except TimeoutError:
                break  # fewer than counted: someone else took some
        await handle.cancel()
        return [_dead_letter(d) for d in received[:want]]
    finally:
        await handle.cancel()
        for delivery in received:
            if not delivery.settled:
                await delivery.requeue()
        await handle.close()


async def replay_dead_letters(
    transport: Transport,
    topology: Topology,
    *,
    message_id: str | None = None,
    limit: int = 100_000,
) -> tuple[int, int]:
    """Publish dead letters back where they came from (after a fix), then remove
    them from the DLQ. Only ``message_id`` when given. Returns (replayed, kept)."""
    replayed = kept = 0
    skipped: list[Delivery] = []
    run = uuid.uuid4().hex
    # Only what is there now: a replayed message that fails again comes back to the
    # DLQ, and must not be replayed again by the same run.
    stats = await transport.queue_stats(topology.dead_letter_queue)
    budget = min(limit, stats.messages if stats is not None else 0)
    try:
        for _ in range(budget):
            delivery = await transport.get(topology.dead_letter_queue)
            if delivery is None:
                break
            if delivery.headers.get(_RUN_HEADER) == run or (
                message_id is not None and delivery.message_id != message_id
            ):
                skipped.append(delivery)
                continue
            letter = _dead_letter(delivery)
            headers = {
                k: v
                for k, v in delivery.headers.items()
                if not k.startswith("x-sessionbus-reject")
                and k not in {"x-death", HEADERS.REJECTED_BY}
            }
            headers[_RUN_HEADER] = run
            exchange = letter.original_exchange or ""
            await transport.publish(
                exchange,
                letter.original_routing_key or "",
                delivery.to_outgoing(headers=headers),
                mandatory=exchange == "",
            )
            await delivery.ack()
            replayed += 1
    finally:
        for delivery in skipped:
            await delivery.requeue()
            kept += 1
    return replayed, kept


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


_RUN_HEADER = "x-sessionbus-replay-run"
_jsonl = msgspec.json.Encoder()


def to_json_line(env: EventEnvelope) -> bytes:
    return _jsonl.encode(env) + b"\n"
