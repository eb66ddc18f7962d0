"""The deploy/ files configure the broker the way the tests run it: the same policies
(and so the same limits) as the queues are declared with, and every deprecated feature
refused as on the RabbitMQ 4 test node."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from contracts import Topology
from sessionctl.definitions import definitions

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _refused() -> list[str]:
    text = (DEPLOY / "local" / "refuse-deprecated.conf").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_the_committed_definitions_carry_the_generated_policies() -> None:
    committed = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    users = [user["name"] for user in committed["users"]]
    generated = definitions(Topology(), dict.fromkeys(users, "-"))
    assert committed["policies"] == generated["policies"]


def test_the_policies_set_the_limits_the_queues_are_declared_with() -> None:
    topology = Topology()
    policies = definitions(topology, dict.fromkeys(["coordinator", "operator"], "-"), modules=())
    for spec in topology.queue_specs():
        matching = [p for p in policies["policies"] if re.fullmatch(p["pattern"], spec.name)]
        limit = spec.arguments.get("x-delivery-limit")
        for policy in matching:
            if "delivery-limit" in policy["definition"]:
                assert policy["definition"]["delivery-limit"] == limit, spec.name
            if "dead-letter-exchange" in policy["definition"]:
                assert (
                    policy["definition"]["dead-letter-exchange"]
                    == spec.arguments["x-dead-letter-exchange"]
                ), spec.name
            if "max-age" in policy["definition"]:
                assert policy["definition"]["max-age"] == spec.arguments["x-max-age"], spec.name
        if limit is not None:
            assert matching, f"{spec.name}: no policy states its delivery limit"


@pytest.mark.parametrize(
    "path", ["rabbitmq/rabbitmq.conf", "k8s/rabbitmq-cluster.yaml"], ids=["compose", "k8s"]
)
def test_the_deployed_broker_refuses_every_deprecated_feature(path: str) -> None:
    lines = {line.strip() for line in (DEPLOY / path).read_text().splitlines()}
    assert set(_refused()) <= lines
