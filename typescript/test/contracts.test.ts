/**
 * What the TypeScript SDK hard-codes of the wire is what the Python contracts say:
 * topology names, the module queue's declaration arguments and bindings (RabbitMQ
 * refuses a redeclaration that differs), header names, the registry stream's id, the
 * status enum, transitions and the seed's STATUS_MAPPINGS.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import {
  DELIVERY_LIMIT,
  foldSession,
  HEADERS,
  REGISTRY_ID,
  SessionStatus,
  STATUS_MAPPINGS,
  Topology,
  TRANSITIONS,
  type wire,
} from "../src/index.js";
import { REPO_ROOT, VENV_BIN } from "./support/env.js";

const PYTHON = `
import json
from contracts import REGISTRY_ID, STATUS_MAPPINGS, TRANSITIONS, SessionStatus, Topology
from contracts.topology import DELIVERY_LIMIT, HEADERS
t = Topology("tss-contract")
t7 = Topology("tss-contract", 7)
ids = ["00000000-0000-4000-8000-000000000002", "ffffffff-ffff-4fff-bfff-ffffffffffff", "4b1c0e8e-9a6f-4f0e-8f7e-2d9c1b3a5e77"]
spec = t.module_queue_spec("task-loop")
print(json.dumps({
    "registry_id": str(REGISTRY_ID),
    "delivery_limit": DELIVERY_LIMIT,
    "headers": {k: v for k, v in vars(HEADERS).items() if k.isupper()},
    "queue": {"name": spec.name, "arguments": spec.arguments, "bindings": [list(b) for b in spec.bindings]},
    "names": {"events": t.events_exchange, "heartbeats": t.heartbeats_exchange,
              "dlx": t.dead_letter_exchange, "dlq": t.dead_letter_queue,
              "dead_letters": t.dead_letter_stream, "commands": t.commands_queue()},
    "statuses": [s.value for s in SessionStatus],
    "transitions": {k.value: sorted(v.value for v in vs) for k, vs in TRANSITIONS.items()},
    "mappings": {k: v.value for k, v in STATUS_MAPPINGS.items()},
    "partitions": {i: t7.command_queue_for(__import__("uuid").UUID(i)) for i in ids},
    "no_session": t7.command_queue_for(None),
}))
`;

const python = JSON.parse(
  execFileSync(join(VENV_BIN, "python"), ["-c", PYTHON], { cwd: REPO_ROOT, encoding: "utf8" }),
) as Record<string, any>;

test("topology names, queue arguments and headers are the Python contracts'", () => {
  const t = new Topology("tss-contract");
  const spec = t.moduleQueueSpec("task-loop");
  assert.deepEqual(
    { name: spec.name, arguments: spec.arguments, bindings: spec.bindings },
    python.queue,
  );
  assert.deepEqual(
    {
      events: t.eventsExchange,
      heartbeats: t.heartbeatsExchange,
      dlx: t.deadLetterExchange,
      dlq: t.deadLetterQueue,
      dead_letters: t.deadLetterStream,
      commands: t.commandsQueue,
    },
    python.names,
  );
  assert.deepEqual({ ...HEADERS }, python.headers);
  assert.equal(REGISTRY_ID, python.registry_id);
  assert.equal(DELIVERY_LIMIT, python.delivery_limit);
  const t7 = new Topology("tss-contract", 7);
  for (const [sid, queue] of Object.entries(python.partitions)) assert.equal(t7.commandQueueFor(sid), queue);
  assert.equal(t7.commandQueueFor(null), python.no_session);
});

test("SessionStatus, its transitions and STATUS_MAPPINGS are the Python contracts'", () => {
  assert.deepEqual(Object.values(SessionStatus), python.statuses);
  assert.deepEqual(
    Object.fromEntries(Object.entries(TRANSITIONS).map(([k, v]) => [k, [...v].sort()])),
    python.transitions,
  );
  assert.deepEqual({ ...STATUS_MAPPINGS }, python.mappings);
});

test("foldSession refuses an event that does not follow", () => {
  const env = (version: number, event: wire.EventEnvelope["event"]): wire.EventEnvelope => ({
    event_id: "00000000-0000-4000-8000-000000000001",
    session_id: "00000000-0000-4000-8000-000000000002",
    version,
    occurred_at: "2026-12-03T00:00:00Z",
    actor: "t",
    prev_hash: "0".repeat(64),
    hash: "0".repeat(64),
    event,
  });
  assert.throws(() => foldSession(null, env(2, { type: "session.created" })), /must start with session.created/);
  const created = foldSession(null, env(1, { type: "session.created", steps: ["a"] }));
  assert.equal(created.status, SessionStatus.INITIALIZING);
  assert.throws(() => foldSession(created, env(3, { type: "session.activity-recorded" })), /does not follow/);
  const linked = foldSession(
    created,
    env(2, { type: "session.linked", module_id: "executor", module_session_id: "00000000-0000-4000-8000-000000000003" }),
  );
  assert.equal(linked.executor_session_id, "00000000-0000-4000-8000-000000000003");
  assert.equal(linked.modules?.executor?.status, SessionStatus.ACTIVE);
});
