/**
 * A bench module process for `benchmarks/typescript.py`: the TypeScript twin of the
 * Python bench module in benchmarks/bus.py. A SessionManager that joins no session
 * (so it sends nothing back), consumes its own quorum queue through the SDK (acks,
 * per-session order, dedupe by version) and records per session the versions it
 * applied and when. Prints `ready`, then `applied N` as N changes; on SIGTERM writes
 * its report (JSON, the Python bench module's shape) to OUT.
 *
 *   node dist/bench/bench-module.js MODULE_ID PREFIX URL OUT
 */
import { renameSync, writeFileSync } from "node:fs";
import { AmqpTransport, SessionManager, Topology, type wire, type WorkflowSession } from "../src/index.js";
import { REGISTRY_ID } from "../src/topology.js";

class BenchModule extends SessionManager {
  static override required = false;
  readonly spans = new Map<string, [number, number]>();

  override shouldJoin(_session: WorkflowSession): boolean {
    return false;
  }

  /** Nothing to load: the prefix is fresh, every session's events arrive from version
   * 1, and the coordinator may not be running yet. */
  protected override async catchUp(): Promise<void> {}

  protected override applied(env: wire.EventEnvelope): void {
    if (env.session_id === REGISTRY_ID) return;
    const now = Date.now() / 1000;
    const span = this.spans.get(env.session_id);
    if (span === undefined) this.spans.set(env.session_id, [now, now]);
    else span[1] = now;
  }

  report(): Record<string, unknown> {
    const s = this.consumer.stats;
    return {
      module_id: this.moduleId,
      stats: {
        received: s.received,
        applied: s.applied,
        duplicates: s.duplicates,
        gaps_filled: s.gapsFilled,
        dead_lettered: s.deadLettered,
        requeued: s.requeued,
      },
      versions: Object.fromEntries(this.consumer.versions),
      spans: Object.fromEntries(this.spans),
    };
  }
}

const [moduleId, prefix, url, out] = process.argv.slice(2);
if (!moduleId || !prefix || !url || !out) {
  console.error("usage: bench-module MODULE_ID PREFIX URL OUT");
  process.exit(2);
}
const module = new BenchModule(new AmqpTransport(url, { connectionName: `${prefix} ${moduleId}` }), {
  moduleId,
  topology: new Topology(prefix),
  ownTransport: true,
  register: false,
  heartbeatIntervalMs: 0,
});
module.consumer.recordVersions = true;
await module.start();
process.stdout.write("ready\n");
let last = -1;
const progress = setInterval(() => {
  const applied = module.consumer.stats.applied;
  if (applied !== last) {
    process.stdout.write(`applied ${applied}\n`);
    last = applied;
  }
}, 25);
const stop = new AbortController();
process.once("SIGTERM", () => stop.abort());
process.once("SIGINT", () => stop.abort());
await module.runUntil(stop.signal);
clearInterval(progress);
writeFileSync(`${out}.partial`, JSON.stringify(module.report()));
renameSync(`${out}.partial`, out);
