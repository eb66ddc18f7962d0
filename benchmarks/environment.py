"""The machine and software a run measured: versions, services, memory."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import shutil
import sqlite3
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import psycopg

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def postgres_base_url() -> str:
    return os.environ.get("SESSIONBUS_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def amqp_url() -> str:
    """The broker, as the test suite finds it."""
    return os.environ.get("SESSIONBUS_TEST_AMQP_URL", DEFAULT_AMQP_URL)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def postgres_server_version(url: str) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
    except (psycopg.Error, OSError):  # not reachable: not measured
        return None


def _last_line(*argv: str) -> str | None:
    """The last line a broker tool prints, or ``None`` when it is absent or fails."""
    tool = shutil.which(argv[0])
    if tool is None:
        return None
    try:
        done = subprocess.run(
            [tool, *argv[1:]], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1].strip() if done.returncode == 0 and lines else None


def rabbitmq_version() -> str | None:
    """``rabbitmqctl version``."""
    return _last_line("rabbitmqctl", "version")


def erlang_version() -> str | None:
    """The Erlang/OTP release the broker runs on (``rabbitmq-diagnostics``)."""
    return _last_line("rabbitmq-diagnostics", "-q", "erlang_version")


def versions(postgres_url: str) -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "sessionbus": _package_version("sessionbus"),
        "eventsourcing": _package_version("eventsourcing"),
        "msgspec": _package_version("msgspec"),
        "aio-pika": _package_version("aio-pika"),
        "psycopg": _package_version("psycopg"),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres_server_version(postgres_url),
        "rabbitmq": rabbitmq_version(),
        "erlang": erlang_version(),
    }


def host() -> dict[str, Any]:
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_bytes": mem_total,
        "implementation": platform.python_implementation(),
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc/self/status."""
    rss = peak = 0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return rss, peak


def postgres_reachable(url: str) -> str | None:
    """``None`` when PostgreSQL answers, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def rabbitmq_reachable(url: str) -> str | None:
    """``None`` when RabbitMQ accepts an AMQP connection, else why not."""

    async def connect() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        asyncio.run(connect())
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def postgres_schema(base_url: str, prefix: str = "bench") -> Iterator[str]:
    """A fresh schema, dropped afterwards; yields the store URL pointing at it."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    parts = urllib.parse.urlsplit(base_url)
    query = urllib.parse.urlencode({"schema": schema})
    try:
        yield urllib.parse.urlunsplit(parts._replace(query=query))
    finally:
        with psycopg.connect(base_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
