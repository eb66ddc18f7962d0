"""Smoke tests: the suite reaches the real broker and database it claims to use."""

from __future__ import annotations

import aio_pika
import pytest

from tests.support import services


@pytest.mark.broker
async def test_broker_round_trip_through_a_prefixed_queue(amqp_url: str, prefix: str) -> None:
    """A message published to a queue under the test's prefix comes back unchanged."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # Exclusive: a transient queue that is not exclusive is a deprecated feature
        # (refused by RabbitMQ 4.3 by default, and on the RabbitMQ 4 test node).
        queue = await channel.declare_queue(f"{prefix}.smoke", durable=False, exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"ping"), routing_key=queue.name, mandatory=True
        )
        message = await queue.get(timeout=5, fail=True)
        assert message is not None
        await message.ack()
        assert message.body == b"ping"


@pytest.mark.postgres
def test_postgres_schema_is_private_to_the_test(postgres_url: str, pg_schema: str) -> None:
    """A table made in the test's schema is visible there and nowhere else."""
    services.pg_execute(postgres_url, f'CREATE TABLE "{pg_schema}".probe (x int)')
    services.pg_execute(postgres_url, f'INSERT INTO "{pg_schema}".probe VALUES (42)')
    rows = services.pg_execute(postgres_url, f'SELECT x FROM "{pg_schema}".probe')
    assert rows == [(42,)]
    visible = services.pg_execute(
        postgres_url,
        f"SELECT count(*) FROM information_schema.tables WHERE table_schema = '{pg_schema}'",
    )
    assert visible == [(1,)]
