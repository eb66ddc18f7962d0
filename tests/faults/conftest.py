"""Fixtures of the fault-injection suite.

Sizes: see ``tests.faults.sizes`` (``SESSIONBUS_FAULTS_FULL=1`` for the big run).
The private RabbitMQ node (``private_broker``) is started once for the tests that
restart a broker or need TLS, and always stopped at the end; the shared broker is
never restarted or reconfigured.
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
