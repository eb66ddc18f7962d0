/**
 * A TypeScript module that journals what it applies and every hook call (with the
 * answer to each link it sent), in the format of the Python
 * tests/support/journal_module.py, so tests/support/checker.py reads both alike.
 *
 *   node dist/test/support/journal-module.js MODULE_ID PREFIX URL JOURNAL
 *
 * Each line is written with one synchronous `write` on an O_APPEND descriptor, so a
 * SIGKILL loses none. `t` is CLOCK_MONOTONIC in seconds, as Python's time.monotonic();
 * `wt` is wall-clock seconds, the clock the coordinator stamps events with.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import {
  AmqpTransport,
  CommandFailed,
  type ModuleSessionConfig,
  type ModuleSessionInfo,
  SessionManager,
  type SessionManagerOptions,
  Topology,
  type wire,
  type WorkflowSession,
} from "../../src/index.js";
import { REGISTRY_ID } from "../../src/topology.js";

export const monotonic = (): number => Number(process.hrtime.bigint()) / 1e9;
const wall = (): number => Date.now() / 1000;

export class Journal {
  private fd: number | null;
  readonly records: Array<Record<string, unknown>> = [];

  constructor(readonly path: string | null) {
    this.fd = path === null ? null : openSync(path, "a");
  }

  write(kind: string, fields: Record<string, unknown> = {}): void {
    const record = { k: kind, ...fields };
    this.records.push(record);
    if (this.fd !== null) writeSync(this.fd, `${JSON.stringify(record)}\n`);
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}

export class JournalModule extends SessionManager {
  readonly made: Array<[string, string]> = [];
  readonly destroyedSessions: string[] = [];
  readonly appliedVersions: Array<[string, number]> = [];

  constructor(
    transport: AmqpTransport,
    options: SessionManagerOptions,
    readonly journal: Journal = new Journal(null),
  ) {
    super(transport, options);
    journal.write("start", { pid: process.pid, t: monotonic(), module: this.moduleId });
    // Every link the manager sends, with the coordinator's answer.
    const link = this.client.linkModuleSession.bind(this.client);
    this.client.linkModuleSession = async (wsid, moduleId, msid, opts) => {
      const wt = wall();
      try {
        await link(wsid, moduleId, msid, opts);
      } catch (error) {
        if (error instanceof CommandFailed) journal.write("link", { w: wsid, m: msid, wt, r: error.code });
        throw error;
      }
      journal.write("link", { w: wsid, m: msid, wt, r: "ok" });
    };
  }

  override async onCreate(session: WorkflowSession, moduleSessionId: string, _config: ModuleSessionConfig) {
    this.made.push([session.sessionId, moduleSessionId]);
    this.journal.write("made", { w: session.sessionId, m: moduleSessionId, wt: wall() });
    return { pid: process.pid };
  }

  override async onDestroy(info: ModuleSessionInfo): Promise<void> {
    this.destroyedSessions.push(info.sessionId);
    this.journal.write("destroyed", { w: info.linkedWorkflowSessionId, m: info.sessionId, wt: wall() });
  }

  protected override caughtUp(baseline: ReadonlyMap<string, number>): void {
    this.journal.write("baseline", { v: Object.fromEntries(baseline) });
  }

  protected override applied(env: wire.EventEnvelope): void {
    if (env.session_id === REGISTRY_ID) {
      this.journal.write("r", { e: env.event_id });
      return;
    }
    this.appliedVersions.push([env.session_id, env.version]);
    this.journal.write("a", { s: env.session_id, v: env.version, e: env.event_id, t: monotonic() });
  }
}

async function main(argv: string[]): Promise<void> {
  const [moduleId, prefix, url, path] = argv;
  if (!moduleId || !prefix || !url || !path) {
    console.error("usage: journal-module MODULE_ID PREFIX URL JOURNAL");
    process.exit(2);
  }
  const journal = new Journal(path);
  const transport = new AmqpTransport(url, {
    connectionName: process.env.SESSIONBUS_CONNECTION_NAME ?? `module ${moduleId}`,
  });
  const module = new JournalModule(
    transport,
    {
      moduleId,
      topology: new Topology(prefix),
      ownTransport: true,
      heartbeatIntervalMs: 1000,
      clientTimeoutMs: 3000,
    },
    journal,
  );
  const stop = new AbortController();
  process.once("SIGTERM", () => stop.abort());
  process.once("SIGINT", () => stop.abort());
  await module.start();
  journal.write("ready", { t: monotonic() });
  process.stdout.write("ready\n");
  await module.runUntil(stop.signal);
  journal.write("stop", { stats: { ...module.consumer.stats }, t: monotonic() });
  journal.close();
}

if (process.argv[1]?.endsWith("journal-module.js")) {
  main(process.argv.slice(2)).catch((error) => {
    console.error(error);
    process.exit(1);
  });
}
