"""Locating and checking the real RabbitMQ and PostgreSQL the tests use."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"


@functools.cache
def docker_available() -> bool:
    """Whether a Docker engine (not just the client) answers ``GET /_ping``."""
    if os.environ.get("SESSIONBUS_TEST_NO_DOCKER"):
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            hostname, _, port = host.removeprefix("tcp://").partition(":")
            address = (hostname, int(port or 2375))
        else:
            return False
        with sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
            return reply.startswith(b"HTTP/1.") and b" 200 " in reply
    except OSError:
        return False


def amqp_target() -> str:
    return os.environ.get("SESSIONBUS_TEST_AMQP_URL", DEFAULT_AMQP_URL)


def postgres_target() -> str:
    return os.environ.get("SESSIONBUS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def management_target() -> str:
    return os.environ.get("SESSIONBUS_TEST_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL)


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def _unreachable(what: str, url: str, exc: BaseException, hint: str) -> None:
    pytest.fail(
        f"{what} is not reachable at {redact(url)}: {type(exc).__name__}: {exc}. {hint}",
        pytrace=False,
    )


async def _check_amqp(url: str) -> None:
    import aio_pika  # noqa: PLC0415 - imported only when a broker is checked

    connection = await aio_pika.connect(url, timeout=10)
    await connection.close()


@contextlib.contextmanager
def rabbitmq() -> Iterator[str]:
    if docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415 - only with Docker

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(container.port)
            url = f"amqp://guest:guest@{host}:{port}/"
            os.environ.setdefault(
                "SESSIONBUS_TEST_MANAGEMENT_URL",
                f"http://guest:guest@{host}:{container.get_exposed_port(15672)}/",
            )
            asyncio.run(_check_amqp(url))
            yield url
        return
    url = amqp_target()
    try:
        asyncio.run(_check_amqp(url))
    except Exception as exc:  # noqa: BLE001 - reported as a test failure below
        _unreachable(
            "RabbitMQ",
            url,
            exc,
            "Start it (rabbitmq-server -detached) or set SESSIONBUS_TEST_AMQP_URL.",
        )
    _check_plugins()
    yield url


def _check_plugins() -> None:
    """Fail at once, naming the command, when the broker's management API (queue views,
    clean-up) or stream port (the audit stream) is off: otherwise a handful of tests
    fail one by one much later with less obvious errors."""
    try:
        _management("GET", "/api/overview")
    except (urllib.error.URLError, OSError) as exc:
        _unreachable(
            "The RabbitMQ management API",
            management_target(),
            exc,
            "Run `make services` (deploy/local/services.sh enables the management and "
            "stream plugins) or set SESSIONBUS_TEST_MANAGEMENT_URL.",
        )


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    if docker_available():
        from testcontainers.postgres import PostgresContainer  # noqa: PLC0415 - only with Docker

        with PostgresContainer("postgres:16", driver=None) as container:
            url = container.get_connection_url()
            pg_execute(url, "SELECT 1")
            yield url
        return
    url = postgres_target()
    try:
        pg_execute(url, "SELECT 1")
    except Exception as exc:  # noqa: BLE001 - reported as a test failure below
        _unreachable(
            "PostgreSQL",
            url,
            exc,
            "Start it (pg_ctlcluster --skip-systemctl-redirect 15 main start) or set "
            "SESSIONBUS_TEST_POSTGRES_URL.",
        )
    yield url


def pg_execute(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg  # noqa: PLC0415 - imported only when PostgreSQL is used

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(sql.encode())
        return cur.fetchall() if cur.description else []


def _management(method: str, path: str) -> Any:
    base = urllib.parse.urlsplit(management_target())
    request = urllib.request.Request(  # noqa: S310 - the URL is the test broker's own
        urllib.parse.urlunsplit(base._replace(netloc=base.hostname + f":{base.port}", path=path)),
        method=method,
    )
    auth = f"{base.username or 'guest'}:{base.password or 'guest'}"
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        body = response.read()
    return json.loads(body) if body else None


def delete_topology(amqp_url: str, prefix: str) -> None:
    """Delete every queue and exchange whose name starts with ``prefix.``."""
    del amqp_url  # the management API is addressed separately
    vhost = "%2F"
    try:
        queues = _management("GET", f"/api/queues/{vhost}?columns=name")
        exchanges = _management("GET", f"/api/exchanges/{vhost}?columns=name")
    except (urllib.error.URLError, OSError):
        return  # no management API: the per-test names are unique, leftovers are harmless
    for kind, items in (("queues", queues), ("exchanges", exchanges)):
        for item in items:
            name = item["name"]
            if name.startswith(prefix + "."):
                with contextlib.suppress(urllib.error.URLError, OSError):
                    _management(
                        "DELETE", f"/api/{kind}/{vhost}/{urllib.parse.quote(name, safe='')}"
                    )
