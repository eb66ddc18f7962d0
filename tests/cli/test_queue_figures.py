"""`sessionctl queues` reads figures and rates from rabbitmq_prometheus (where RabbitMQ 4
keeps them) at the URL it is given: two scrapes, rates from the counters' growth."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from contracts import Topology
from contracts.topology import QueueSpec
from module_sdk.testing import InProcessBus
from sessionctl import admin
from sessionctl.admin import list_queues
from transport.amqp import AmqpTransport
from transport.port import TransportError

PUBLISHED_PER_SCRAPE = 50.0
DELIVERED_PER_SCRAPE = 30.0


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """A /metrics/detailed endpoint whose counters grow by a fixed step per scrape."""

    scrapes: ClassVar[int] = 0
    queries: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        cls = type(self)
        cls.queries.append(self.path)
        n = cls.scrapes
        cls.scrapes += 1
        labels = 'vhost="/",queue="x.commands"'
        body = "\n".join(
            [
                "# TYPE rabbitmq_detailed_queue_messages_ready gauge",
                f"rabbitmq_detailed_queue_messages_ready{{{labels}}} 7",
                "# TYPE rabbitmq_detailed_queue_messages_unacked gauge",
                f"rabbitmq_detailed_queue_messages_unacked{{{labels}}} 2",
                "# TYPE rabbitmq_detailed_queue_messages gauge",
                f"rabbitmq_detailed_queue_messages{{{labels}}} 9",
                "# TYPE rabbitmq_detailed_queue_consumers gauge",
                f"rabbitmq_detailed_queue_consumers{{{labels}}} 1",
                "# TYPE rabbitmq_detailed_queue_exchange_messages_published_total counter",
                (
                    "rabbitmq_detailed_queue_exchange_messages_published_total"
                    f'{{vhost="/",exchange="",queue="x.commands"}} {n * PUBLISHED_PER_SCRAPE}'
                ),
                "# TYPE rabbitmq_detailed_queue_messages_delivered_ack_total counter",
                (
                    "rabbitmq_detailed_queue_messages_delivered_ack_total"
                    f"{{{labels}}} {n * DELIVERED_PER_SCRAPE}"
                ),
                "# TYPE rabbitmq_detailed_queue_messages_ready gauge",
                'rabbitmq_detailed_queue_messages_ready{vhost="/",queue="other.commands"} 5',
                "",
            ]
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    _Endpoint.scrapes, _Endpoint.queries = 0, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


async def test_figures_and_rates_come_from_the_prometheus_endpoint(endpoint: str) -> None:
    transport = InProcessBus().transport("guest")
    window = 0.2
    (info,) = await list_queues(
        transport,
        Topology("x"),
        "amqp://guest:guest@127.0.0.1:5999/",
        None,
        [],
        prometheus_url=endpoint,
        rate_window=window,
    )
    assert (info.name, info.source) == ("x.commands", "prometheus")
    assert (info.messages, info.ready, info.unacked, info.consumers) == (9, 7, 2, 1)
    # One step of each counter over the time between the two scrapes (at least the
    # window): the rate is positive and at most step / window.
    assert info.publish_rate is not None
    assert info.deliver_rate is not None
    assert 0 < info.publish_rate <= PUBLISHED_PER_SCRAPE / window
    assert 0 < info.deliver_rate <= DELIVERED_PER_SCRAPE / window
    assert info.publish_rate / info.deliver_rate == pytest.approx(50 / 30)
    assert len(_Endpoint.queries) == 2
    assert all(q.startswith("/metrics/detailed?vhost=%2F&family=") for q in _Endpoint.queries)


@pytest.mark.broker
async def test_an_exclusive_queue_of_another_connection_keeps_the_management_row(
    amqp_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A console's live-feed queue is exclusive to the console's connection; listed by
    the management API before it has figures, it refuses the passive declare that
    would fill them in (RESOURCE_LOCKED). The listing goes on without them."""
    topology = Topology(prefix)
    feed_queue = topology.console_queue_for("other")
    owner, reader = AmqpTransport(amqp_url), AmqpTransport(amqp_url)
    await owner.connect()
    await reader.connect()
    try:
        await owner.declare_queue(QueueSpec(feed_queue, durable=False, exclusive=True))
        rows = [{"name": feed_queue, "type": "classic"}]  # listed, no figures yet
        monkeypatch.setattr(admin, "_management_rows", lambda _url, _vhost: rows)
        (info,) = await list_queues(reader, topology, amqp_url, "http://127.0.0.1:1/", [])
        assert (info.name, info.kind, info.ready, info.source) == (
            feed_queue,
            "classic",
            None,
            "management",
        )
        with pytest.raises(TransportError, match="RESOURCE_LOCKED"):
            await reader.queue_stats(feed_queue)  # what the listing passed over
    finally:
        await owner.delete_queue(feed_queue)
        await owner.close()
        await reader.close()
