/**
 * The TypeScript module as a process of its own, killed (SIGKILL) and stopped
 * (SIGTERM) while sessions it holds move on, then restarted with the missed events in
 * its queue: it catches up and re-runs no hooks for history — no onCreate for a
 * session destroyed meanwhile, no second onDestroy, no link attempt for a destroyed
 * session — and the fault checker finds nothing lost, nothing applied twice and no
 * spurious hook call, for the TypeScript module and the Python one beside it.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { AmqpTransport, CoordinatorClient, SessionStatus, Topology } from "../src/index.js";
import {
  AMQP_URL,
  type Child,
  checkJournals,
  coordinator,
  deletePrefix,
  pythonModule,
  readJournal,
  requireBroker,
  tempDir,
  tsModule,
  uniquePrefix,
  waitFor,
} from "./support/env.js";

const prefix = uniquePrefix("restart");
const dir = tempDir("restart");
const store = join(dir, "store.sqlite");
const tsJournal = join(dir, "executor.jsonl");
const pyJournal = join(dir, "task-loop.jsonl");
let coord: Child;
let python: Child;
let ts: Child;
let transport: AmqpTransport;
let ops: CoordinatorClient;

before(async () => {
  await requireBroker();
  coord = await coordinator(prefix, `sqlite:///${store}`).start();
  python = await pythonModule("task-loop", prefix, pyJournal).start();
  ts = await tsModule("executor", prefix, tsJournal).start();
  transport = new AmqpTransport(AMQP_URL, { connectionName: "tss restart ops" });
  await transport.connect();
  ops = new CoordinatorClient(transport, new Topology(prefix));
});

after(async () => {
  await ts?.kill();
  await python?.stop();
  await coord?.stop();
  await transport?.close();
  await deletePrefix(prefix);
});

async function create(): Promise<string> {
  // A short cleanup timeout: a module that is down cannot unlink, and the session
  // still ends (with the module's session recorded as orphaned).
  return (await ops.createWorkflowSession(["s"], { cleanupTimeoutMs: 1000 })).sessionId;
}

async function status(sid: string): Promise<string> {
  const result = await ops.call({ type: "get-workflow-session", session_id: sid });
  if (result.type !== "session" || result.session == null) return "gone";
  return result.session.destroyed ? "destroyed" : result.session.status;
}

async function activeWithBoth(sid: string): Promise<boolean> {
  const s = await ops.getWorkflowSession(sid);
  return s?.status === SessionStatus.ACTIVE && !!s.modules.executor && !!s.modules["task-loop"];
}

const destroyed = async (sid: string) => ["destroyed", "gone"].includes(await status(sid));

/** The hook lines of one life of a journal (0 = first). */
function life(path: string, index: number): Array<Record<string, any>> {
  const lives: Array<Array<Record<string, any>>> = [];
  for (const record of readJournal(path)) {
    if (record.k === "start") lives.push([]);
    lives.at(-1)?.push(record);
  }
  return lives[index] ?? [];
}

test("a killed and a stopped TypeScript module catch up without re-running hooks for history", async () => {
  const first = [await create(), await create(), await create(), await create()];
  for (const sid of first) await waitFor(`${sid} ACTIVE`, () => activeWithBoth(sid));

  // Killed: two of its sessions are destroyed, one completes, two are created, and
  // one is created and destroyed (its whole history waits in the module's queue).
  await ts.kill();
  await ops.destroyWorkflowSession(first[0]!);
  await ops.destroyWorkflowSession(first[1]!);
  await ops.updateSessionStatus(first[2]!, SessionStatus.COMPLETED);
  const whileKilled = [await create(), await create()];
  const bornAndGone = await create();
  await waitFor(`${bornAndGone} linked by task-loop`, async () => !!(await ops.getWorkflowSession(bornAndGone))?.modules["task-loop"]);
  await ops.destroyWorkflowSession(bornAndGone);
  for (const sid of [...first.slice(0, 2), bornAndGone]) await waitFor(`${sid} destroyed`, () => destroyed(sid));
  await ts.start();
  for (const sid of whileKilled) await waitFor(`${sid} ACTIVE after the restart`, () => activeWithBoth(sid));

  // Stopped gracefully: one more destroyed, one more created.
  assert.equal(await ts.stop(), 0, ts.output);
  await ops.destroyWorkflowSession(first[2]!);
  const whileStopped = await create();
  await waitFor(`${first[2]} destroyed`, () => destroyed(first[2]!));
  await ts.start();
  await waitFor(`${whileStopped} ACTIVE after the restart`, () => activeWithBoth(whileStopped));

  // Everything left ends normally, both modules unlinking.
  const rest = [first[3]!, ...whileKilled, whileStopped];
  for (const sid of rest) await ops.destroyWorkflowSession(sid);
  for (const sid of rest) await waitFor(`${sid} destroyed`, () => destroyed(sid));
  for (const sid of rest) {
    const last = (await ops.getSessionHistory(sid)).events.at(-1)!.event;
    assert.deepEqual(last.type === "session.destroyed" ? (last.orphaned ?? {}) : last, {});
  }
  assert.equal(await ts.stop(), 0, ts.output);
  assert.equal(await python.stop(), 0, python.output);

  // Hooks per life: each reacts to the state it found, never to the history.
  const hooks = (index: number, kind: string) =>
    life(tsJournal, index)
      .filter((r) => r.k === kind)
      .map((r) => r.w as string)
      .sort();
  const sorted = (ids: string[]) => [...ids].sort();
  assert.deepEqual(hooks(0, "made"), sorted(first));
  assert.deepEqual(hooks(0, "destroyed"), []);
  assert.deepEqual(hooks(1, "made"), sorted(whileKilled));
  assert.deepEqual(hooks(1, "link"), sorted(whileKilled));
  // first[2] was destroyed while no life ran: its module session is the coordinator's
  // orphan record now, not a hook call in a later life.
  assert.deepEqual(hooks(1, "destroyed"), []);
  assert.deepEqual(hooks(2, "made"), [whileStopped]);
  assert.deepEqual(hooks(2, "link"), [whileStopped]);
  assert.deepEqual(hooks(2, "destroyed"), sorted(rest));
  assert.ok(life(tsJournal, 2).every((r) => r.k !== "link" || r.r === "ok"));

  const verdict = await checkJournals(`sqlite:///${store}`, { executor: tsJournal, "task-loop": pyJournal });
  assert.equal(verdict.summary.lost, 0, JSON.stringify(verdict.problems));
  assert.equal(verdict.summary.duplicated_applied, 0, JSON.stringify(verdict.problems));
  assert.equal(verdict.summary.spurious_hooks, 0, JSON.stringify(verdict.problems));
  assert.ok(verdict.ok, JSON.stringify(verdict));
  assert.ok((verdict.summary.applied ?? 0) > 0);
});
