"""Scenario 7: poison and malformed messages, to a module's queue and to the commands
queue, in volume, while a load runs.

Hypothesis generates the messages: random bytes, JSON of the wrong shape, truncated
messages, bodies over the size limit, a valid message with a non-UUID id or an unknown
event / command type, content types nobody speaks, and (module queue) well-formed
events that can never be applied: of a session the coordinator never had, or a first
event that is not ``session.created``. Every one must end in the dead-letter
queue with a reason (its code, and who rejected it); the consumers keep running (the
load's sessions complete, the checker finds every event applied once); and
``sessionctl dlq list --json`` shows every one of them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import (
    COMMAND_TYPES,
    GENESIS_HASH,
    HEADERS,
    EventEnvelope,
    Linked,
    SessionStatus,
    Topology,
    UpdateSessionStatus,
    seal,
)
from contracts.commands import CommandRequest
from contracts.events import EVENT_TYPES, event_type
from sessionctl.admin import unsettled_dead_letters
from tests.faults.harness import inprocess_system, wait_until
from tests.faults.report import Row, record
from tests.faults.sizes import sized
from tests.support.load import SessionLoad
from tests.support.processes import run_sessionctl
from transport.amqp import AmqpTransport
from transport.port import OutgoingMessage
from transport.topology import declare_topology

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

CASES = sized(250, 10_000)  # per target queue
KNOWN_EVENT_TYPES = {event_type(cls) for cls in EVENT_TYPES}
# A known tag would make a valid command: not poison, but a command the coordinator
# answers (Hypothesis does find them).
KNOWN_COMMAND_TYPES = {str(cls.__struct_config__.tag) for cls in COMMAND_TYPES}
LIMIT = 1 << 20
HUGE = sized(5, 20)  # per target queue


@dataclass(frozen=True)
class Poison:
    kind: str
    body: bytes
    content_type: str | None = "application/json"


def _envelope() -> dict[str, Any]:
    envelope = seal(
        EventEnvelope(
            event_id=uuid.uuid4(),
            session_id=uuid.uuid4(),
            version=1,
            occurred_at=datetime.now(UTC),
            actor="coordinator",
            prev_hash=GENESIS_HASH,
            hash=GENESIS_HASH,
            event=Linked(module_id="task-loop", module_session_id=uuid.uuid4()),
        )
    )
    fields: dict[str, Any] = msgspec.to_builtins(envelope)
    return fields


def _request() -> dict[str, Any]:
    request = CommandRequest(
        command_id=uuid.uuid4(),
        issued_at=datetime.now(UTC),
        command=UpdateSessionStatus(session_id=uuid.uuid4(), status=SessionStatus.ACTIVE),
    )
    fields: dict[str, Any] = msgspec.to_builtins(request)
    return fields


def _not_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return True
    return False


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def poison(draw: st.DrawFn, target: str) -> Poison:
    """One poison message for the module queue (``target="module"``) or the commands
    queue (``target="commands"``)."""
    valid = _envelope() if target == "module" else _request()
    kinds = [
        "random-bytes",
        "random-bytes",
        "wrong-schema",
        "wrong-schema",
        "half-schema",
        "truncated",
        "non-uuid-id",
        "non-uuid-id",
        "unknown-type",
        "unknown-type",
        "content-type",
        "msgpack-garbage",
    ]
    if target == "module":
        kinds += ["unknown-session", "wrong-first-event"]
    kind = draw(st.sampled_from(kinds))
    if kind == "random-bytes":
        return Poison(kind, draw(st.binary(max_size=300)))
    if kind == "wrong-schema":
        return Poison(kind, json.dumps(draw(JSON_VALUES)).encode())
    if kind == "half-schema":
        # The right keys, some with values of the wrong type.
        broken = dict(valid)
        for key in draw(st.lists(st.sampled_from(sorted(valid)), min_size=1, max_size=3)):
            broken[key] = draw(st.one_of(st.integers(), st.lists(st.none()), st.booleans()))
        return Poison(kind, json.dumps(broken, default=str).encode())
    if kind == "truncated":
        body = msgspec.json.encode(valid)
        return Poison(kind, body[: draw(st.integers(0, len(body) - 1))])
    if kind == "non-uuid-id":
        text = draw(st.text(max_size=40).filter(_not_uuid))
        keys = ["event_id", "session_id"] if target == "module" else ["command_id"]
        valid[draw(st.sampled_from(keys))] = text
        return Poison(kind, msgspec.json.encode(valid))
    if kind == "unknown-type":
        known = KNOWN_EVENT_TYPES if target == "module" else KNOWN_COMMAND_TYPES
        tag = draw(st.text(min_size=1, max_size=30).filter(lambda t: t not in known))
        if target == "module":
            valid["event"]["type"] = tag
        else:
            valid["command"]["type"] = tag
        return Poison(kind, msgspec.json.encode(valid))
    if kind == "content-type":
        content_type = draw(
            st.sampled_from(["text/plain", "application/x-pickle", "application/xml"])
        )
        return Poison(kind, msgspec.json.encode(valid), content_type)
    if kind == "msgpack-garbage":
        return Poison(kind, draw(st.binary(max_size=200)), "application/msgpack")
    if kind == "wrong-first-event":
        # Well-formed and sealed, but a session cannot start with session.linked.
        return Poison(kind, msgspec.json.encode(_envelope()))
    assert kind == "unknown-session"
    # Well-formed, sealed, and about a session the coordinator never had.
    fake = _envelope()
    fake["version"] = draw(st.integers(2, 50))
    return Poison(kind, msgspec.json.encode(fake))


def generate(target: str, count: int) -> list[Poison]:
    """``count`` poison messages: ``HUGE`` bodies just over the size limit and (module
    queue) three events that cannot start a session, the rest from Hypothesis (no
    example database: every run explores afresh). Huge bodies are kept few: a megabyte
    each, they would only load the shared broker."""
    found: list[Poison] = [
        Poison("huge", b'{"pad":"' + b"x" * (LIMIT + 1 + index * 97) + b'"}')
        for index in range(HUGE)
    ]
    if target == "module":  # every run has some, whatever Hypothesis draws
        found += [Poison("wrong-first-event", msgspec.json.encode(_envelope()))] * 3
    count -= len(found)

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(poison(target))
    def collect(item: Poison) -> None:
        found.append(item)

    collect()
    return found


@pytest.mark.timeout(sized(150, 900))
async def test_poison_goes_to_the_dead_letter_queue_with_a_reason_and_consumers_keep_running(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cases = {
        "module": await asyncio.to_thread(generate, "module", CASES),
        "commands": await asyncio.to_thread(generate, "commands", CASES),
    }
    async with inprocess_system(amqp_url, prefix, tmp_path, request.node.nodeid[-120:]) as system:
        runtime = await system.start_coordinator()
        executor = await system.add_module("executor")
        topology = system.topology
        attacker = await system.connect("attacker")
        targets = {
            "module": topology.module_queue("executor"),
            "commands": topology.commands_queue(),
        }
        load = SessionLoad(await system.client(), sessions=sized(30, 200), rate=10.0, deadline=120)
        running = asyncio.create_task(load.run())
        sent: dict[str, tuple[str, Poison]] = {}
        for target, items in cases.items():
            batch: list[tuple[str, OutgoingMessage]] = []
            for index, item in enumerate(items):
                message_id = f"poison-{target}-{index}"
                sent[message_id] = (target, item)
                batch.append(
                    (
                        targets[target],
                        OutgoingMessage(
                            body=item.body,
                            content_type=item.content_type,  # type: ignore[arg-type]
                            message_id=message_id,
                            persistent=False,
                        ),
                    )
                )
                if len(batch) == 200:
                    await attacker.publish_many("", batch)
                    batch = []
            if batch:
                await attacker.publish_many("", batch)
        result = await running
        assert result.failures == [], result.failures[:10]

        async def all_dead() -> bool:
            return len(await unsettled_dead_letters(attacker, topology)) >= len(sent)

        try:
            await wait_until(
                all_dead, timeout=sized(90, 600), what="every poison message in the DLQ", every=0.5
            )
        except TimeoutError:
            stats = len(await unsettled_dead_letters(attacker, topology))
            there = {d["message_id"] for d in await _dlq_list(amqp_url, prefix, limit=len(sent))}
            absent = {m: sent[m][1].kind for m in sorted(set(sent) - there)}
            raise AssertionError(
                f"{stats} of {len(sent)} dead-lettered; executor {executor.consumer.stats}, "
                f"coordinator rejected {runtime.server.rejected}; not in the DLQ: {absent}"
            ) from None
        await system.settle()
        # The consumers are alive: one more session, end to end, after all of it.
        client = await system.client("after")
        after = (await client.create_workflow_session(["after"])).session_id
        await wait_until(
            lambda: runtime.coordinator.projections.sessions[after].status is SessionStatus.ACTIVE,
            timeout=20,
            what="a session after the poison to be ACTIVE",
        )
        await client.destroy_workflow_session(after)
        await system.settle()
        report = await system.check([*result.sessions, after])
        report.assert_ok()
        dead_by_module = executor.consumer.stats.dead_lettered
        rejected_by_coordinator = runtime.server.rejected

        listing = await _dlq_list(amqp_url, prefix, limit=len(sent) + 100)

    letters = {d["message_id"]: d for d in listing}
    missing = sorted(set(sent) - set(letters))
    assert not missing, (
        f"{len(missing)} of {len(sent)} poison messages not among the {len(listing)} in "
        f"`sessionctl dlq list`: {missing[:10]}"
    )
    assert len(listing) == len(sent), "more dead letters than poison: something good died"
    reasonless = []
    for message_id, (target, item) in sent.items():
        letter = letters[message_id]
        expected_by = "executor" if target == "module" else "coordinator"
        if not (letter["reason"] and letter["code"] and letter["rejected_by"] == expected_by):
            reasonless.append((item.kind, letter["code"], letter["rejected_by"], letter["reason"]))
    assert not reasonless, f"{len(reasonless)} dead letters without a reason: {reasonless[:10]}"
    kinds = Counter(f"{t}:{item.kind}" for t, item in sent.values())
    codes = Counter(str(d["code"]) for d in listing)
    assert codes["MESSAGE_TOO_LARGE"] == kinds["module:huge"] + kinds["commands:huge"]
    record(
        Row(
            scenario="7 poison + malformed",
            load=f"{len(result.sessions)} sessions alongside; {result.describe()}",
            faults=f"{len(sent)} poison messages ({CASES} per queue, module + commands), "
            f"kinds {dict(sorted(kinds.items()))}; DLQ codes {dict(codes)}; dead-lettered by "
            f"executor {dead_by_module}, by coordinator {rejected_by_coordinator}",
            events_checked=report.events_checked,
            lost=len(report.lost),
            duplicated_applied=len(report.duplicated),
            spurious_hooks=report.spurious_hook_count,
            recovery="n/a (consumers never stopped)",
        )
    )


async def _dlq_list(amqp_url: str, prefix: str, *, limit: int) -> list[dict[str, Any]]:
    result = await run_sessionctl(
        "dlq", "list", "--json", "--prefix", prefix, "--amqp-url", amqp_url,
        "--limit", str(limit), timeout=300,
    )  # fmt: skip
    assert result.code == 0, f"sessionctl dlq list exited {result.code}: {result.err}"
    listing: list[dict[str, Any]] = json.loads(result.out)
    return listing


@pytest.mark.timeout(120)
async def test_dlq_list_shows_more_dead_letters_than_a_connection_has_channels(
    amqp_url: str, prefix: str
) -> None:
    """RabbitMQ allows 2047 channels per connection by default: a listing must not
    need one per dead letter."""
    topology = Topology(prefix)
    count = 2600
    async with AmqpTransport(amqp_url, connection_name=f"{prefix} dead letters") as transport:
        await declare_topology(transport, topology)
        batch = [
            (
                "",
                OutgoingMessage(
                    body=b"{}",
                    content_type="application/json",
                    message_id=f"dead-{index}",
                    headers={
                        HEADERS.REJECT_REASON: "refused for the test",
                        HEADERS.REJECT_CODE: "INVALID_MESSAGE",
                        HEADERS.REJECTED_BY: "executor",
                    },
                    persistent=False,
                ),
            )
            for index in range(count)
        ]
        for start in range(0, count, 500):
            await transport.publish_many(topology.dead_letter_exchange, batch[start : start + 500])
        await wait_until(
            lambda: _depth(transport, topology, count),
            timeout=30,
            what="the dead letters in the DLQ",
        )
        listing = await _dlq_list(amqp_url, prefix, limit=count + 100)
        assert sorted(d["message_id"] for d in listing) == sorted(f"dead-{i}" for i in range(count))
        # Listing leaves them where they were.
        again = await _dlq_list(amqp_url, prefix, limit=count + 100)
        assert len(again) == count


async def _depth(transport: AmqpTransport, topology: Topology, count: int) -> bool:
    return len(await unsettled_dead_letters(transport, topology)) >= count
