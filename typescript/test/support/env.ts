/**
 * What every test needs: the broker (which must be reachable: a test fails, never
 * skips, without it), unique topology prefixes, child processes (the Python
 * coordinator and Python modules, started as tests/support/processes.py starts them),
 * bounded waits, and the management API for users and clean-up.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, existsSync, readFileSync } from "node:fs";
import { connect as netConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
/** typescript/ (tests run from dist/test/support). */
export const PACKAGE_ROOT = resolve(here, "..", "..", "..");
export const REPO_ROOT = resolve(PACKAGE_ROOT, "..");
export const VENV_BIN = process.env.SESSIONBUS_VENV_BIN ?? join(REPO_ROOT, ".venv", "bin");
export const AMQP_URL = process.env.SESSIONBUS_TEST_AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/";
export const MANAGEMENT_URL = process.env.SESSIONBUS_TEST_MANAGEMENT_URL ?? "http://guest:guest@127.0.0.1:15672/";

/** A topology prefix of the test's own (`tss-<name>-<random>`). */
export function uniquePrefix(name: string): string {
  const slug = name.toLowerCase().replace(/[^a-z0-9]+/g, "-").slice(0, 24);
  return `tss-${slug}-${randomBytes(3).toString("hex")}`;
}

export function tempDir(name: string): string {
  return mkdtempSync(join(tmpdir(), `tss-${name}-`));
}

/** Fails (the test with it) when the broker does not accept a TCP connection. */
export async function requireBroker(url = AMQP_URL): Promise<void> {
  const parsed = new URL(url);
  const port = Number(parsed.port || 5672);
  await new Promise<void>((resolvePromise, reject) => {
    const socket = netConnect({ host: parsed.hostname, port, timeout: 5000 });
    socket.once("connect", () => {
      socket.destroy();
      resolvePromise();
    });
    const fail = (why: string) => {
      socket.destroy();
      reject(new Error(`RabbitMQ is not reachable at ${parsed.hostname}:${port} (${why}); start it (make services)`));
    };
    socket.once("timeout", () => fail("timeout"));
    socket.once("error", (error) => fail(error.message));
  });
}

/** Wait until `probe` returns a value other than undefined/false, or fail naming `what`. */
export async function waitFor<T>(
  what: string,
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${String(last)}` : ""}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** One child process whose output is kept for failure messages. */
export class Child {
  proc: ChildProcess | null = null;
  readonly lines: string[] = [];
  private exited: Promise<number | null> | null = null;

  constructor(
    readonly name: string,
    readonly argv: string[],
    readonly env: Record<string, string> = {},
    readonly cwd = REPO_ROOT,
  ) {}

  get output(): string {
    return this.lines.slice(-200).join("\n");
  }

  get running(): boolean {
    return this.proc !== null && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Spawn and wait (bounded) for a line containing `ready`. */
  async start(ready = "ready", timeoutMs = 60_000): Promise<this> {
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) {
      if (v !== undefined && !k.startsWith("SESSIONBUS_")) env[k] = v;
    }
    Object.assign(env, { SESSIONBUS_LOG_LEVEL: "WARNING", PYTHONUNBUFFERED: "1" }, this.env);
    env.SESSIONBUS_CONNECTION_NAME ??= `sessionbus ts test ${this.name}`;
    const mark = this.lines.length;
    const proc = spawn(this.argv[0]!, this.argv.slice(1), { cwd: this.cwd, env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    this.exited = new Promise((r) => proc.once("exit", (code) => r(code)));
    let readyResolve!: () => void;
    const isReady = new Promise<void>((r) => {
      readyResolve = r;
    });
    const pump = (stream: NodeJS.ReadableStream) => {
      let buffer = "";
      stream.setEncoding("utf8");
      stream.on("data", (chunk: string) => {
        buffer += chunk;
        const parts = buffer.split("\n");
        buffer = parts.pop() ?? "";
        for (const line of parts) {
          this.lines.push(line);
          if (this.lines.length > mark && line.includes(ready)) readyResolve();
        }
      });
    };
    pump(proc.stdout!);
    pump(proc.stderr!);
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        isReady,
        this.exited.then((code) => {
          throw new Error(`${this.name} exited with ${code} before it was ready:\n${this.output}`);
        }),
        new Promise((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`${this.name} not ready within ${timeoutMs} ms:\n${this.output}`)),
            timeoutMs,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
    return this;
  }

  /** SIGTERM and the exit code (SIGKILL after the timeout, and fail). */
  async stop(timeoutMs = 30_000): Promise<number | null> {
    if (this.proc === null || this.exited === null) return null;
    if (this.running) this.proc.kill("SIGTERM");
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([
      this.exited,
      new Promise<"timeout">((r) => {
        timer = setTimeout(() => r("timeout"), timeoutMs);
      }),
    ]);
    clearTimeout(timer);
    if (code === "timeout") {
      this.proc.kill("SIGKILL");
      await this.exited;
      throw new Error(`${this.name} did not stop within ${timeoutMs} ms:\n${this.output}`);
    }
    return code;
  }

  /** SIGKILL, and wait until it is gone. */
  async kill(): Promise<void> {
    if (this.proc !== null && this.running) {
      this.proc.kill("SIGKILL");
      await this.exited;
    }
  }
}

export function coordinator(prefix: string, store: string, identity = "guest=*", url = AMQP_URL): Child {
  return new Child("coordinator", [
    join(VENV_BIN, "sessionctl"),
    "coordinator",
    "--amqp-url",
    url,
    "--store",
    store,
    "--prefix",
    prefix,
    "--identity",
    identity,
  ]);
}

/** The Python journal module (tests/support/journal_module.py) as a process. */
export function pythonModule(moduleId: string, prefix: string, journal: string, url = AMQP_URL): Child {
  return new Child(`python ${moduleId}`, [
    join(VENV_BIN, "python"),
    "-m",
    "tests.support.journal_module",
    "--module-id",
    moduleId,
    "--prefix",
    prefix,
    "--url",
    url,
    "--journal",
    journal,
  ]);
}

/** The TypeScript journal module (test/support/journal-module.ts) as a process. */
export function tsModule(moduleId: string, prefix: string, journal: string, url = AMQP_URL): Child {
  return new Child(
    `ts ${moduleId}`,
    [process.execPath, join(PACKAGE_ROOT, "dist", "test", "support", "journal-module.js"), moduleId, prefix, url, journal],
    {},
    PACKAGE_ROOT,
  );
}

export function readJournal(path: string): Array<Record<string, any>> {
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8")
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => JSON.parse(line) as Record<string, any>);
}

// -- management API ---------------------------------------------------------------------

export async function management(method: string, path: string, body?: unknown): Promise<any> {
  const base = new URL(MANAGEMENT_URL);
  const auth = Buffer.from(`${decodeURIComponent(base.username || "guest")}:${decodeURIComponent(base.password || "guest")}`).toString("base64");
  const response = await fetch(new URL(path, `${base.protocol}//${base.host}`), {
    method,
    headers: { Authorization: `Basic ${auth}`, "Content-Type": "application/json" },
    body: body === undefined ? null : JSON.stringify(body),
  });
  if (!response.ok && response.status !== 404) {
    throw new Error(`management ${method} ${path}: ${response.status} ${await response.text()}`);
  }
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** A broker user with full permissions on / (what a module's user gets). */
export async function createUser(name: string, password: string): Promise<void> {
  const user = encodeURIComponent(name);
  await management("PUT", `/api/users/${user}`, { password, tags: "" });
  await management("PUT", `/api/permissions/%2F/${user}`, { configure: ".*", write: ".*", read: ".*" });
}

export async function deleteUser(name: string): Promise<void> {
  await management("DELETE", `/api/users/${encodeURIComponent(name)}`);
}

export function userUrl(user: string, password: string, url = AMQP_URL): string {
  const parsed = new URL(url);
  parsed.username = encodeURIComponent(user);
  parsed.password = encodeURIComponent(password);
  return parsed.toString();
}

/** Delete every queue and exchange of a prefix. */
export async function deletePrefix(prefix: string): Promise<void> {
  const queues = (await management("GET", "/api/queues/%2F?columns=name")) as Array<{ name: string }>;
  for (const q of queues ?? []) {
    if (q.name.startsWith(`${prefix}.`)) await management("DELETE", `/api/queues/%2F/${encodeURIComponent(q.name)}`);
  }
  const exchanges = (await management("GET", "/api/exchanges/%2F?columns=name")) as Array<{ name: string }>;
  for (const e of exchanges ?? []) {
    if (e.name.startsWith(`${prefix}.`)) await management("DELETE", `/api/exchanges/%2F/${encodeURIComponent(e.name)}`);
  }
}

/** Take (and ack) every message of a queue through the management API. */
export async function drainQueue(queue: string): Promise<Array<{ payload: string; properties: any; routing_key: string }>> {
  return (await management("POST", `/api/queues/%2F/${encodeURIComponent(queue)}/get`, {
    count: 1000,
    ackmode: "ack_requeue_false",
    encoding: "auto",
  })) as Array<{ payload: string; properties: any; routing_key: string }>;
}

/** The fault checker's verdict (tests/support/checker.py) on module journals. */
export interface Verdict {
  ok: boolean;
  summary: Record<string, number | null>;
  problems: Record<string, string[]>;
}

const CHECK = `
import json, sys
from pathlib import Path
from tests.support.checker import check, read_journal
store, journals = sys.argv[1], json.loads(sys.argv[2])
report = check(store, {m: read_journal(Path(p)) for m, p in journals.items()})
names = ("store_problems", "lost", "duplicated", "out_of_order", "phantom", "mismatched", "spurious_hooks")
print(json.dumps({"ok": report.ok, "summary": report.summary(),
                  "problems": {n: getattr(report, n)[:20] for n in names}}))
`;

export async function checkJournals(store: string, journals: Record<string, string>): Promise<Verdict> {
  const { execFile } = await import("node:child_process");
  const stdout = await new Promise<string>((resolvePromise, reject) => {
    execFile(
      join(VENV_BIN, "python"),
      ["-c", CHECK, store, JSON.stringify(journals)],
      { cwd: REPO_ROOT, maxBuffer: 16 << 20 },
      (error, out, err) => (error ? reject(new Error(`checker failed: ${error.message}\n${err}`)) : resolvePromise(out)),
    );
  });
  return JSON.parse(stdout) as Verdict;
}
