/**
 * The floor under the TypeScript module in `benchmarks/typescript.py`: amqplib alone
 * consuming a queue declared exactly as a module queue (quorum, dead-lettered, single
 * active consumer, bound to every session event), with the same prefetch, acking each
 * delivery — no decoding, validation, ordering or dedupe. It reads the session id and
 * version from the headers the relay sets, so its report has the bench module's shape
 * and the parent can check it received every event once.
 *
 *   node dist/bench/bare-consumer.js QUEUE_NAME PREFIX URL OUT [PREFETCH]
 */
import { renameSync, writeFileSync } from "node:fs";
import { connect } from "amqplib";

const [moduleId, prefix, url, out, prefetchArg] = process.argv.slice(2);
if (!moduleId || !prefix || !url || !out) {
  console.error("usage: bare-consumer MODULE_ID PREFIX URL OUT [PREFETCH]");
  process.exit(2);
}
const queue = `${prefix}.module.${moduleId}`;
const connection = await connect(url, { clientProperties: { connection_name: `${prefix} ${moduleId}` } });
const channel = await connection.createChannel();
await channel.assertQueue(queue, {
  durable: true,
  arguments: {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": `${prefix}.dlx`,
    "x-delivery-limit": 10,
    "x-single-active-consumer": true,
  },
});
for (const key of ["session.#", "module.orphan-cleanup-requested"]) {
  await channel.bindQueue(queue, `${prefix}.events`, key);
}
await channel.prefetch(Number(prefetchArg ?? 128));
const versions = new Map<string, number[]>();
const spans = new Map<string, [number, number]>();
let received = 0;
await channel.consume(
  queue,
  (message) => {
    if (message === null) return;
    received += 1;
    const headers = message.properties.headers ?? {};
    const sid = String(headers["x-session-id"]);
    const now = Date.now() / 1000;
    const list = versions.get(sid);
    if (list === undefined) versions.set(sid, [Number(headers["x-session-version"])]);
    else list.push(Number(headers["x-session-version"]));
    const span = spans.get(sid);
    if (span === undefined) spans.set(sid, [now, now]);
    else span[1] = now;
    channel.ack(message);
  },
  { noAck: false },
);
process.stdout.write("ready\n");
let last = -1;
const progress = setInterval(() => {
  if (received !== last) {
    process.stdout.write(`applied ${received}\n`);
    last = received;
  }
}, 25);
await new Promise<void>((resolve) => {
  process.once("SIGTERM", () => resolve());
  process.once("SIGINT", () => resolve());
});
clearInterval(progress);
await channel.close().catch(() => {});
await connection.close().catch(() => {});
const report = {
  module_id: moduleId,
  stats: { received, applied: received, duplicates: 0, gaps_filled: 0, dead_lettered: 0, requeued: 0 },
  versions: Object.fromEntries(versions),
  spans: Object.fromEntries(spans),
};
writeFileSync(`${out}.partial`, JSON.stringify(report));
renameSync(`${out}.partial`, out);
