/**
 * The package README's module, exactly as written: extracted, type-checked against
 * the built package, compiled, and run against the broker and a coordinator.
 */
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { after, before, test } from "node:test";
import ts from "typescript";
import { AmqpTransport, CoordinatorClient, SessionStatus, Topology } from "../src/index.js";
import {
  AMQP_URL,
  type Child,
  coordinator,
  deletePrefix,
  PACKAGE_ROOT,
  requireBroker,
  tempDir,
  uniquePrefix,
  waitFor,
} from "./support/env.js";

const START = "<!-- module-example:start -->";
const END = "<!-- module-example:end -->";

export function readmeExample(): string {
  const text = readFileSync(join(PACKAGE_ROOT, "README.md"), "utf8");
  const block = text.slice(text.indexOf(START) + START.length, text.indexOf(END));
  const match = /```ts\n([\s\S]*?)```/.exec(block);
  if (match === null) throw new Error("no ```ts block between the module-example markers");
  return match[1]!;
}

const prefix = uniquePrefix("readme");
const dir = tempDir("readme");
let coord: Child;
let transport: AmqpTransport;

before(async () => {
  await requireBroker();
  coord = await coordinator(prefix, `sqlite:///${join(dir, "store.sqlite")}`).start();
  transport = new AmqpTransport(AMQP_URL, { connectionName: "tss readme ops" });
  await transport.connect();
});

after(async () => {
  await transport?.close();
  await coord?.stop();
  await deletePrefix(prefix);
});

test("the README's module is at most 20 lines, type-checks and runs a session through", async () => {
  const source = readmeExample();
  assert.ok(source.trimEnd().split("\n").length <= 20, `${source.split("\n").length} lines`);
  // Inside the package, so `@sessionbus/module-sdk` resolves to this package by name.
  const work = join(PACKAGE_ROOT, ".test-work");
  mkdirSync(work, { recursive: true });
  const file = join(work, "readme-example.ts");
  writeFileSync(file, source);
  const config = ts.getParsedCommandLineOfConfigFile(join(PACKAGE_ROOT, "tsconfig.json"), {}, {
    ...ts.sys,
    onUnRecoverableConfigFileDiagnostic: (d) => {
      throw new Error(ts.flattenDiagnosticMessageText(d.messageText, "\n"));
    },
  })!;
  const program = ts.createProgram([file], { ...config.options, outDir: work, rootDir: work, noEmit: false, sourceMap: false });
  const emitted = program.emit();
  const diagnostics = [...ts.getPreEmitDiagnostics(program), ...emitted.diagnostics];
  assert.deepEqual(
    diagnostics.map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n")),
    [],
    "the README example does not type-check",
  );

  process.env.SESSIONBUS_PREFIX = prefix;
  const example = (await import(pathToFileURL(join(work, "readme-example.js")).href)) as {
    main(url: string, stop: AbortSignal): Promise<void>;
  };
  const stop = new AbortController();
  const running = example.main(AMQP_URL, stop.signal);
  try {
    const ops = new CoordinatorClient(transport, new Topology(prefix));
    await waitFor("the executor registered", async () => (await ops.getModule("executor")) !== null);
    const sid = (await ops.createWorkflowSession(["open"])).sessionId;
    const session = await waitFor("ACTIVE with the README's executor linked", async () => {
      const s = await ops.getWorkflowSession(sid);
      return s?.status === SessionStatus.ACTIVE && s.modules.executor ? s : undefined;
    });
    assert.deepEqual(session.modules.executor!.metadata, { engine: "chromium" });
    await ops.destroyWorkflowSession(sid);
    await waitFor("destroyed, the executor unlinked", async () => {
      const r = await ops.call({ type: "get-workflow-session", session_id: sid });
      return r.type === "session" && (r.session == null || r.session.destroyed === true);
    });
    const last = (await ops.getSessionHistory(sid)).events.at(-1)!.event;
    assert.deepEqual(last.type === "session.destroyed" ? (last.orphaned ?? {}) : last, {});
  } finally {
    stop.abort();
    await running;
    delete process.env.SESSIONBUS_PREFIX;
  }
});
