/**
 * Deliveries as the broker may hand them over — duplicated, reordered, malformed —
 * injected straight into a TypeScript module's queue (unbound from the events
 * exchange, so nothing else arrives): each event applied once, in version order, gaps
 * filled from the coordinator; every poison message dead-lettered with its reason,
 * with the same code and field headers the Python SDK gives the same message.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { connect, type Channel, type ChannelModel } from "amqplib";
import {
  AmqpTransport,
  CoordinatorClient,
  HEADERS,
  MODULE_ROUTING_KEYS,
  SessionManager,
  SessionStatus,
  Topology,
  type WorkflowSession,
} from "../src/index.js";
import {
  AMQP_URL,
  type Child,
  coordinator,
  deletePrefix,
  drainQueue,
  pythonModule,
  requireBroker,
  tempDir,
  uniquePrefix,
  waitFor,
} from "./support/env.js";

class Observer extends SessionManager {
  static override moduleId = "observer";
  static override required = false;
  override shouldJoin(_session: WorkflowSession): boolean {
    return false;
  }
}

const prefix = uniquePrefix("delivery");
const topology = new Topology(prefix);
const dir = tempDir("delivery");
let coord: Child;
let python: Child;
let observer: Observer;
let transport: AmqpTransport;
let ops: CoordinatorClient;
let raw: ChannelModel;
let channel: Channel;

before(async () => {
  await requireBroker();
  coord = await coordinator(prefix, `sqlite:///${join(dir, "store.sqlite")}`).start();
  python = await pythonModule("task-loop", prefix, join(dir, "task-loop.jsonl")).start();
  observer = new Observer(new AmqpTransport(AMQP_URL, { connectionName: "tss observer" }), {
    topology,
    ownTransport: true,
    heartbeatIntervalMs: 0,
  });
  observer.consumer.recordVersions = true;
  await observer.start();
  raw = await connect(AMQP_URL);
  channel = await raw.createChannel();
  // Only what the test injects reaches the observer from here on.
  for (const key of MODULE_ROUTING_KEYS) {
    await channel.unbindQueue(topology.moduleQueue("observer"), topology.eventsExchange, key);
  }
  transport = new AmqpTransport(AMQP_URL, { connectionName: "tss delivery ops" });
  await transport.connect();
  ops = new CoordinatorClient(transport, topology);
});

after(async () => {
  await observer?.close();
  await channel?.close().catch(() => {});
  await raw?.close().catch(() => {});
  await transport?.close();
  await python?.stop();
  await coord?.stop();
  await deletePrefix(prefix);
});

function inject(queue: string, body: Buffer | string, options: { contentType?: string; messageId?: string } = {}) {
  channel.sendToQueue(queue, Buffer.from(body), {
    contentType: options.contentType ?? "application/json",
    messageId: options.messageId ?? randomUUID(),
    persistent: true,
  });
}

test("duplicated and reordered deliveries are applied once each, in version order", async () => {
  const sid = (await ops.createWorkflowSession(["s"])).sessionId;
  await waitFor("ACTIVE", async () => (await ops.getWorkflowSession(sid))?.status === SessionStatus.ACTIVE);
  for (let i = 0; i < 3; i += 1) await ops.recordActivity(sid);
  await ops.updateSessionStatus(sid, SessionStatus.COMPLETED);
  const history = (await ops.getSessionHistory(sid)).events;
  assert.equal(history.length, 7, history.map((e) => e.event.type).join(","));
  const byVersion = new Map(history.map((e) => [e.version, e]));

  const order = [1, 2, 2, 1, 3, 5, 4, 3, 7, 6, 7];
  for (const v of order) inject(topology.moduleQueue("observer"), JSON.stringify(byVersion.get(v)));
  const stats = observer.consumer.stats;
  await waitFor("every copy settled", () => stats.received === order.length && stats.duplicates === 7);
  assert.deepEqual(observer.consumer.versions.get(sid), [1, 2, 3, 4, 5, 6, 7]);
  assert.equal(stats.gapsFilled, 3); // v5 before v4: v4 (and what followed) came from the coordinator
  assert.equal(stats.deadLettered, 0);
  assert.equal(observer.getWorkflowSession(sid)?.status, SessionStatus.COMPLETED);
  assert.equal(observer.getWorkflowSession(sid)?.version, 7);
});

test("poison messages are dead-lettered with their reason, as the Python SDK does", async () => {
  const envelope = (fields: Record<string, unknown>) => ({
    event_id: randomUUID(),
    session_id: randomUUID(),
    version: 1,
    occurred_at: new Date().toISOString(),
    actor: "someone",
    prev_hash: "0".repeat(64),
    hash: "a".repeat(64),
    event: { type: "session.created" },
    ...fields,
  });
  const { hash: _dropped, ...withoutHash } = envelope({});
  const poisons: Array<{ id: string; body: string; contentType?: string }> = [
    { id: "malformed", body: "{not json" },
    { id: "missing-field", body: JSON.stringify(withoutHash) },
    { id: "wrong-type", body: JSON.stringify(envelope({ version: "three" })) },
    {
      id: "bad-module-id",
      body: JSON.stringify(
        envelope({
          version: 2,
          event: { type: "session.linked", module_id: "Bad Module", module_session_id: randomUUID() },
        }),
      ),
    },
    { id: "unknown-event-type", body: JSON.stringify(envelope({ event: { type: "session.bogus" } })) },
    { id: "unknown-session", body: JSON.stringify(envelope({ version: 3, event: { type: "session.activity-recorded" } })) },
    { id: "content-type", body: "hello", contentType: "text/plain" },
  ];
  const before = observer.consumer.stats.deadLettered;
  for (const queue of [topology.moduleQueue("observer"), topology.moduleQueue("task-loop")]) {
    for (const p of poisons) inject(queue, p.body, { messageId: `${p.id}`, contentType: p.contentType ?? "application/json" });
  }
  const letters: Array<{ properties: any; routing_key: string; payload: string }> = [];
  await waitFor(
    "every poison message in the dead-letter queue",
    async () => {
      letters.push(...(await drainQueue(topology.deadLetterQueue)));
      return letters.length >= 2 * poisons.length;
    },
    30_000,
  );
  assert.equal(observer.consumer.stats.deadLettered - before, poisons.length);
  const by = (who: string) =>
    new Map(
      letters
        .filter((l) => l.properties.headers?.[HEADERS.REJECTED_BY] === who)
        .map((l) => [l.properties.message_id as string, l] as const),
    );
  const ts = by("observer");
  const py = by("task-loop");
  assert.equal(ts.size, poisons.length);
  assert.equal(py.size, poisons.length);
  for (const p of poisons) {
    const t = ts.get(p.id)!.properties.headers;
    const q = py.get(p.id)!.properties.headers;
    const pick = (h: Record<string, unknown>) => ({
      code: h[HEADERS.REJECT_CODE],
      field: h[HEADERS.REJECT_FIELD] ?? null,
      routingKey: h["x-original-routing-key"] === undefined ? undefined : "set",
      exchange: h["x-original-exchange"],
    });
    if (process.env.TSS_SHOW_DLQ) console.log(p.id, JSON.stringify(t), JSON.stringify(q));
    assert.deepEqual(pick(t), pick(q), `${p.id}: TS ${JSON.stringify(t)} vs Python ${JSON.stringify(q)}`);
    // The reason reads the same too, but for the JSON parser's own words.
    if (p.id === "malformed") {
      assert.match(String(t[HEADERS.REJECT_REASON]), /^malformed json body: /);
    } else {
      assert.equal(t[HEADERS.REJECT_REASON], q[HEADERS.REJECT_REASON], p.id);
    }
    // The body is kept as it came, for `sessionctl dlq replay` after a fix.
    assert.equal(ts.get(p.id)!.payload, p.body);
  }
  // The consumer kept running: a good event after the poison is still applied.
  assert.equal(observer.consumer.stats.requeued, 0);
});

test("on a graceful close everything handled is acked: nothing goes back to the queue", async () => {
  const stats = { ...observer.consumer.stats };
  assert.ok(stats.received > 0);
  await observer.close();
  const queue = await channel.checkQueue(topology.moduleQueue("observer"));
  assert.equal(queue.messageCount, 0, `${queue.messageCount} deliveries were not acked`);
});
