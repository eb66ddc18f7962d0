/**
 * Identity through the broker-validated AMQP user_id, with one broker user per
 * module: a TypeScript module may act only for its own module sessions, and a forged
 * user_id never reaches the coordinator. Then a module's connection is closed by the
 * broker: it reconnects by itself and its consumer is re-established.
 */
import assert from "node:assert/strict";
import { randomBytes, randomUUID } from "node:crypto";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { connect } from "amqplib";
import {
  AmqpTransport,
  CommandFailed,
  CoordinatorClient,
  encode,
  SessionManager,
  SessionStatus,
  Topology,
} from "../src/index.js";
import {
  AMQP_URL,
  type Child,
  coordinator,
  createUser,
  deletePrefix,
  deleteUser,
  management,
  requireBroker,
  tempDir,
  uniquePrefix,
  userUrl,
  waitFor,
} from "./support/env.js";

class Module extends SessionManager {}

const prefix = uniquePrefix("identity");
const topology = new Topology(prefix);
const dir = tempDir("identity");
const suffix = randomBytes(3).toString("hex");
const users = { executor: `tss-executor-${suffix}`, "task-loop": `tss-taskloop-${suffix}` };
const password = randomBytes(8).toString("hex");
let coord: Child;
let executor: Module;
let taskLoop: Module;
let ops: CoordinatorClient;
let opsTransport: AmqpTransport;

before(async () => {
  await requireBroker();
  for (const user of Object.values(users)) await createUser(user, password);
  const identity = `${users.executor}=executor;${users["task-loop"]}=task-loop;guest=*`;
  coord = await coordinator(prefix, `sqlite:///${join(dir, "store.sqlite")}`, identity).start();
  const module = (id: keyof typeof users) =>
    new Module(new AmqpTransport(userUrl(users[id], password), { connectionName: `tss ${id}` }), {
      moduleId: id,
      topology,
      ownTransport: true,
      heartbeatIntervalMs: 0,
    });
  executor = await module("executor").start();
  taskLoop = await module("task-loop").start();
  opsTransport = new AmqpTransport(AMQP_URL, { connectionName: "tss identity ops" });
  await opsTransport.connect();
  ops = new CoordinatorClient(opsTransport, topology);
});

after(async () => {
  await executor?.close();
  await taskLoop?.close();
  await opsTransport?.close();
  await coord?.stop();
  for (const user of Object.values(users)) await deleteUser(user);
  await deletePrefix(prefix);
});

async function activeWithBoth(sid: string): Promise<boolean> {
  const s = await ops.getWorkflowSession(sid);
  return s?.status === SessionStatus.ACTIVE && !!s.modules.executor && !!s.modules["task-loop"];
}

test("a TypeScript module may act only for its own module sessions", async () => {
  assert.equal(executor.transport.user, users.executor);
  const sid = (await ops.createWorkflowSession(["s"])).sessionId;
  await waitFor("ACTIVE with both", () => activeWithBoth(sid));
  // Each linked as its own broker user, and that is who the store says acted.
  const history = (await ops.getSessionHistory(sid)).events;
  const actors = Object.fromEntries(
    history.flatMap((e) => (e.event.type === "session.linked" ? [[e.event.module_id, e.actor]] : [])),
  );
  assert.deepEqual(actors, { executor: users.executor, "task-loop": users["task-loop"] });

  // The task loop may not unlink, or set the status of, the executor's session.
  await assert.rejects(taskLoop.client.unlinkModuleSession(sid, "executor"), (error: unknown) => {
    assert.ok(error instanceof CommandFailed);
    assert.equal(error.code, "FORBIDDEN");
    return true;
  });
  await assert.rejects(
    taskLoop.client.updateSessionStatus(sid, SessionStatus.PAUSED, { moduleId: "executor" }),
    (error: unknown) => error instanceof CommandFailed && error.code === "FORBIDDEN",
  );
  // Its own, it may.
  await taskLoop.updateSessionStatus(sid, SessionStatus.PAUSED);
  await waitFor("task-loop PAUSED", () => taskLoop.getSessionStatus(sid) === SessionStatus.PAUSED);

  // A forged user_id: the broker closes the channel; the command never arrives.
  const forger = await connect(userUrl(users["task-loop"], password));
  const channel = await forger.createConfirmChannel();
  const closed = new Promise<Error>((resolve) => channel.once("error", resolve));
  const request = {
    command_id: randomUUID(),
    issued_at: new Date().toISOString(),
    command: { type: "unlink-module-session", session_id: sid, module_id: "executor" },
  };
  channel.publish("", topology.commandsQueue, encode(request), {
    userId: users.executor,
    contentType: "application/json",
    replyTo: "amq.rabbitmq.reply-to",
  });
  const refusal = await closed;
  assert.match(refusal.message, /PRECONDITION_FAILED|user_id/i);
  await forger.close().catch(() => {});
  assert.equal((await ops.getLinkedSessions(sid)).executor, executor.getSession(sid)?.sessionId);
  assert.equal(executor.sessionExists(sid), true);
});

test("a module whose connection the broker closes reconnects and consumes again", async () => {
  const before = executor.transport.reconnects;
  const rows = (await management(
    "GET",
    `/api/connections/username/${encodeURIComponent(users.executor)}`,
  )) as Array<{ name: string }>;
  assert.ok(rows.length > 0, "the executor has a connection");
  await management("DELETE", `/api/connections/username/${encodeURIComponent(users.executor)}`);
  await waitFor("the executor to reconnect", () => executor.transport.reconnects > before);
  // Its consumer is back: a new session is created, linked and seen by it.
  const sid = (await ops.createWorkflowSession(["after"])).sessionId;
  await waitFor("ACTIVE with both after the reconnect", () => activeWithBoth(sid));
  await waitFor("the executor's projection", () => executor.sessionExists(sid));
  const health = await executor.healthCheck();
  assert.equal(health.isHealthy, true);
});

test("a transport given a cluster's addresses uses the first that answers", async () => {
  const unreachable = "amqp://guest:guest@127.0.0.1:1/";
  const t = new AmqpTransport(`${unreachable},${AMQP_URL}`, { connectionName: "tss addresses" });
  assert.deepEqual(t.addresses, [unreachable, AMQP_URL]);
  await t.connect();
  try {
    const client = new CoordinatorClient(t, topology);
    assert.ok((await client.getCoordinatorHealth()).registeredModules.includes("executor"));
  } finally {
    await t.close();
  }
  await assert.rejects(new AmqpTransport(unreachable).connect(), /cannot connect to amqp:\/\/guest:\*\*\*@127.0.0.1:1/);
});
