"""Fixtures of the fault-injection suite.

Sizes: see ``tests.faults.sizes`` (``SESSIONBUS_FAULTS_FULL=1`` for the big run).
The private RabbitMQ node (``private_broker``) is started once for the tests that
restart a broker or need TLS, and the private PostgreSQL server (``private_pg``) once
for the tests that take the database away; both are always stopped at the end. The
shared broker and database are never restarted or reconfigured.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.faults import report
from tests.faults.sizes import FULL
from tests.support.private_broker import PrivateBroker, rabbitmq_available
from tests.support.private_broker import private_broker as start_private_broker
from tests.support.private_postgres import PrivatePostgres, postgres_binaries
from tests.support.private_postgres import private_postgres as start_private_postgres


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateBroker]:
    """A RabbitMQ node of this test session's own (plain and TLS listeners)."""
    if not rabbitmq_available():
        pytest.fail(
            "this fault test restarts a broker or needs TLS, so it starts a private "
            "RabbitMQ node, and rabbitmq-server / rabbitmqctl are not installed here",
            pytrace=False,
        )
    with start_private_broker() as broker:
        yield broker


@pytest.fixture
def private_node(private_broker: PrivateBroker) -> PrivateBroker:
    """The private node, checked healthy before the test (it outlives many tests)."""
    problem = private_broker.health()
    if problem is not None:
        pytest.fail(
            f"the private RabbitMQ node {private_broker.node} is not healthy: {problem}\n"
            f"{private_broker.log_tail()}",
            pytrace=False,
        )
    return private_broker


@pytest.fixture
def private_prefix(request: pytest.FixtureRequest) -> str:
    """A topology prefix for a test on the private node (which is deleted whole at the
    end of the session, so nothing is cleaned up per test)."""
    name = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[:20]
    return f"f{uuid.uuid4().hex[:8]}_{name}".rstrip("_")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not report.ROWS:
        return
    terminalreporter.section("fault injection results" + (" (full)" if FULL else ""))
    for line in report.render():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test session's own, to restart, stop and cut."""
    try:
        postgres_binaries()
    except FileNotFoundError as exc:
        pytest.fail(
            f"this fault test takes a PostgreSQL server away, so it starts a private one: {exc}",
            pytrace=False,
        )
    with start_private_postgres() as server:
        yield server


@pytest.fixture
def private_pg_up(private_pg: PrivatePostgres) -> PrivatePostgres:
    """The private server, running (a test before may have left it stopped)."""
    if not private_pg.running:
        private_pg.start()
    return private_pg


@pytest.fixture
def pgf_store(private_pg_up: PrivatePostgres) -> str:
    """A store URL on the private server, in a schema of this test's own."""
    return private_pg_up.store_url(f"pgf_{uuid.uuid4().hex[:10]}")
