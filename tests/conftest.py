"""Fixtures for the real services every integration test runs against.

The broker and the database come from testcontainers where a Docker engine answers,
otherwise from ``SESSIONBUS_TEST_AMQP_URL`` / ``SESSIONBUS_TEST_POSTGRES_URL`` (defaults:
the local services). An unreachable service fails the tests that need it with a clear
message; it never turns them into skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
from hypothesis import HealthCheck, settings

from tests.support import services

# The suite shares two cores with the broker, the database and module processes: how
# fast hypothesis draws inputs or runs one example says nothing about the code under
# test (a property test failed its "too slow" health check at 1 input in 2.2 s under
# such load), and speed is the benchmarks' to measure, never a test's.
settings.register_profile("sessionbus", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sessionbus")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQP URL of a real RabbitMQ broker, checked reachable."""
    with services.rabbitmq() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a real PostgreSQL database, checked reachable."""
    with services.postgres() as url:
        yield url


@pytest.fixture
def prefix(request: pytest.FixtureRequest, amqp_url: str) -> Iterator[str]:
    """A topology prefix of this test's own; every queue and exchange under it is
    deleted afterwards."""
    name = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[:20]
    value = f"t{uuid.uuid4().hex[:8]}_{name}".rstrip("_")
    yield value
    services.delete_topology(amqp_url, value)


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    services.pg_execute(postgres_url, f'CREATE SCHEMA "{schema}"')
    yield schema
    services.pg_execute(postgres_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_store_url(postgres_url: str, pg_schema: str) -> str:
    """A ``postgresql://`` store URL pointing at this test's schema."""
    parts = urllib.parse.urlsplit(postgres_url)
    query = urllib.parse.urlencode({"schema": pg_schema})
    return urllib.parse.urlunsplit(parts._replace(query=query))


@pytest.fixture
async def amqp_connection(
    amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A robust aio-pika connection named after the test (visible in the broker UI)."""
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": request.node.nodeid[-200:]}
    )
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)


# A test whose fixtures reach a RabbitMQ node (the shared broker, or a private node of
# the fault suite) is marked ``broker``: `.ci/run` runs those against RabbitMQ 4 too.
_BROKER_FIXTURES = frozenset({"amqp_url", "private_broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def pytest_report_header(config: pytest.Config) -> list[str]:
    docker = "yes" if services.docker_available() else "no"
    amqp = services.redact(services.amqp_target())
    postgres = services.redact(services.postgres_target())
    ci = os.environ.get("CI", "")
    return [f"sessionbus services: docker={docker}, amqp={amqp}, postgres={postgres}, CI={ci!r}"]
