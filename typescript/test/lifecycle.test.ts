/**
 * A TypeScript module and a Python module take part in the same workflow sessions,
 * with the Python coordinator as a process: create → both link → ACTIVE → COMPLETED →
 * CLEANUP → both destroy and unlink → destroyed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  AmqpTransport,
  CoordinatorClient,
  foldSession,
  type ModuleSessionInfo,
  SessionManager,
  SessionStatus,
  Topology,
  type wire,
  type WorkflowSession,
} from "../src/index.js";
import {
  AMQP_URL,
  type Child,
  coordinator,
  deletePrefix,
  pythonModule,
  readJournal,
  requireBroker,
  tempDir,
  uniquePrefix,
  waitFor,
} from "./support/env.js";

class Executor extends SessionManager {
  static override moduleId = "executor";
  readonly created = new Map<string, string>(); // workflow session -> module session
  readonly destroyedIds: string[] = [];
  readonly statuses: Array<[string, SessionStatus, SessionStatus]> = [];

  override async onCreate(session: WorkflowSession, moduleSessionId: string) {
    this.created.set(session.sessionId, moduleSessionId);
    return { engine: "chromium" };
  }

  override async onDestroy(info: ModuleSessionInfo): Promise<void> {
    this.destroyedIds.push(info.sessionId);
  }
}

const prefix = uniquePrefix("lifecycle");
const dir = tempDir("lifecycle");
let coord: Child;
let python: Child;
let executor: Executor;
let ops: CoordinatorClient;
let opsTransport: AmqpTransport;

before(async () => {
  await requireBroker();
  coord = await coordinator(prefix, `sqlite:///${join(dir, "store.sqlite")}`).start();
  python = await pythonModule("task-loop", prefix, join(dir, "task-loop.jsonl")).start();
  executor = Executor.connect(AMQP_URL, { prefix, heartbeatIntervalMs: 500 });
  executor.setLifecycleCallbacks({
    onSessionStatusChanged: async (_m, wsid, oldStatus, newStatus) => {
      executor.statuses.push([wsid, oldStatus, newStatus]);
    },
  });
  await executor.start();
  opsTransport = new AmqpTransport(AMQP_URL, { connectionName: "tss lifecycle ops" });
  await opsTransport.connect();
  ops = new CoordinatorClient(opsTransport, new Topology(prefix));
});

after(async () => {
  await executor?.close();
  await opsTransport?.close();
  await python?.stop();
  await coord?.stop();
  await deletePrefix(prefix);
});

test("a TypeScript and a Python module share workflow sessions from create to destroyed", async () => {
  const ids: string[] = [];
  for (let i = 0; i < 3; i += 1) ids.push((await ops.createWorkflowSession(["open", "act"])).sessionId);

  for (const sid of ids) {
    const linked = await waitFor(`session ${sid} ACTIVE with both modules`, async () => {
      const s = await ops.getWorkflowSession(sid);
      return s?.status === SessionStatus.ACTIVE && s.modules.executor && s.modules["task-loop"] ? s : undefined;
    });
    assert.equal(linked.executorSessionId, executor.created.get(sid));
    assert.deepEqual(Object.keys(await ops.getLinkedSessions(sid)).sort(), ["executor", "task-loop"]);
    // Reads are local and synchronous, from the events the module consumed.
    await waitFor("the TS projection to see the link", () => executor.sessionExists(sid));
    assert.equal(executor.getSession(sid)?.sessionId, executor.created.get(sid));
    assert.equal(executor.getSessionStatus(sid), SessionStatus.ACTIVE);
    assert.ok(executor.getLastActivity(sid) instanceof Date);
  }

  const integrity = await ops.validateSessionIntegrity(ids[1]!);
  assert.equal(integrity.isValid, true, JSON.stringify(integrity));
  assert.deepEqual([...integrity.linkedModules].sort(), ["executor", "task-loop"]);
  // Module writes go through the coordinator; so does the workflow's status.
  await executor.recordActivity(ids[0]!);
  await executor.updateSessionStatus(ids[0]!, SessionStatus.PAUSED);
  await waitFor("module status PAUSED", () => executor.getSessionStatus(ids[0]!) === SessionStatus.PAUSED);
  for (const sid of ids) await ops.updateSessionStatus(sid, SessionStatus.COMPLETED);
  await waitFor("COMPLETED seen by the TS module", () =>
    ids.every((sid) => executor.getWorkflowSession(sid)?.status === SessionStatus.COMPLETED),
  );

  for (const sid of ids) await ops.destroyWorkflowSession(sid, "done");
  for (const sid of ids) {
    await waitFor(`session ${sid} destroyed`, async () => {
      const result = await ops.call({ type: "get-workflow-session", session_id: sid });
      return result.type === "session" && (result.session == null || result.session.destroyed === true);
    });
  }
  // Both destroyed and unlinked what they made, once each; nothing was left orphaned.
  assert.deepEqual([...executor.destroyedIds].sort(), [...executor.created.values()].sort());
  assert.equal(executor.created.size, 3);
  const journal = readJournal(join(dir, "task-loop.jsonl"));
  const made = journal.filter((r) => r.k === "made");
  const destroyed = journal.filter((r) => r.k === "destroyed");
  assert.deepEqual(made.map((r) => r.w).sort(), [...ids].sort());
  assert.deepEqual(destroyed.map((r) => r.m).sort(), made.map((r) => r.m).sort());
  for (const sid of ids) {
    const history = await ops.getSessionHistory(sid);
    // The TypeScript fold of the stored history is the coordinator's state.
    let folded: wire.WorkflowSession | null = null;
    for (const env of history.events) folded = foldSession(folded, env);
    const view = (s: wire.WorkflowSession | null | undefined) => ({
      status: s?.status,
      version: s?.version,
      destroyed: s?.destroyed ?? false,
      modules: Object.keys(s?.modules ?? {}),
      executor: s?.executor_session_id ?? null,
      lastActivity: s ? Date.parse(s.last_activity) : null,
    });
    assert.deepEqual(view(folded), view(history.state));
    const types = history.events.map((e) => e.event.type);
    assert.equal(types.filter((t) => t === "session.unlinked").length, 2, types.join(","));
    const last = history.events.at(-1)!.event;
    assert.equal(last.type, "session.destroyed");
    assert.deepEqual(last.type === "session.destroyed" ? (last.orphaned ?? {}) : null, {});
    // The local projection forgot the destroyed session; the callbacks saw each move once.
    assert.equal(executor.sessionExists(sid), false);
    const moves = executor.statuses.filter(([w, , n]) => w === sid && n === SessionStatus.CLEANUP);
    assert.equal(moves.length, 1);
  }
  const health = await executor.healthCheck();
  assert.equal(health.moduleId, "executor");
  assert.equal(health.isHealthy, true);
  assert.equal(health.totalSessions, 3);
  assert.equal(health.activeSessions, 0);
  const coordinatorHealth = await ops.getCoordinatorHealth();
  assert.ok(coordinatorHealth.registeredModules.includes("executor"));
  await waitFor("the TS module's heartbeats to count", async () =>
    (await ops.getCoordinatorHealth()).moduleHealthStatus.executor === true,
  );
});
