/**
 * `CoordinatorClient`: the seed's SessionCoordinator methods that make sense over a
 * bus, as the Python `module_sdk.client` sends them.
 *
 * A request is a `CommandRequest` on the commands queue with a direct reply-to. One
 * that gets no reply in time (or a retryable error) is sent again with the same
 * command id — the coordinator applies a command once and answers every copy the same
 * — up to `attempts`, with exponential back-off; then `CoordinatorUnavailable`. A
 * refusal is a `CommandFailed` carrying the coordinator's typed error.
 *
 * The seed's methods return the seed's shapes (camelCase, `Date`s); the others
 * (`call`, `listWorkflowSessions`, `getSessionHistory`, `registerModule` …) return
 * the wire types of src/generated/wire.ts.
 */
import { randomUUID } from "node:crypto";
import { decodeReply, encode, JSON_CONTENT_TYPE } from "./codec.js";
import {
  CommandFailed,
  CoordinatorUnavailable,
  DecodeError,
  SdkError,
  StoreUnavailable,
  TransportError,
} from "./errors.js";
import type * as wire from "./generated/wire.js";
import type { SessionStatus } from "./status.js";
import { Topology } from "./topology.js";
import { TimeoutError, type AmqpTransport } from "./transport.js";
import {
  type CoordinatorHealth,
  type ModuleSessionConfig,
  type SessionIntegrityReport,
  type StandardError,
  type WorkflowConfig,
  type WorkflowSession,
  toCoordinatorHealth,
  toIntegrityReport,
  toWireModuleSessionConfig,
  toWireStandardError,
  toWireWorkflowConfig,
  toWorkflowSession,
} from "./types.js";

export type Command = wire.CommandRequest["command"];
export type Result = NonNullable<wire.CommandReply["result"]>;
type ResultOf<T extends Result["type"]> = Extract<Result, { type: T }>;

/** Before the second attempt of a command; later ones back off exponentially. */
const FIRST_RETRY_PAUSE_MS = 50;

/** An attempt to try again: no reply, or a refusal marked retryable (`error`). */
class Retryable extends SdkError {
  constructor(
    message: string,
    readonly error: wire.StandardError | null = null,
  ) {
    super(message);
  }
}

export interface ClientOptions {
  /** Per attempt, milliseconds. */
  timeoutMs?: number;
  attempts?: number;
}

/** `create-workflow-session` → `CreateWorkflowSession` (the AMQP `type` property). */
function className(tag: string): string {
  return tag
    .split("-")
    .map((part) => part.charAt(0).toUpperCase() + part.slice(1))
    .join("");
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class CoordinatorClient {
  readonly timeoutMs: number;
  readonly attempts: number;

  constructor(
    readonly transport: AmqpTransport,
    readonly topology: Topology = new Topology(),
    options: ClientOptions = {},
  ) {
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.attempts = Math.max(1, options.attempts ?? 3);
  }

  /** Send one command and return its result. */
  async call(command: Command, options: { timeoutMs?: number; commandId?: string } = {}): Promise<Result> {
    const request: wire.CommandRequest = {
      command_id: options.commandId ?? randomUUID(),
      issued_at: new Date().toISOString(),
      command,
    };
    const body = encode(request);
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    let delay = FIRST_RETRY_PAUSE_MS;
    let last: unknown;
    for (let attempt = 1; attempt <= this.attempts; attempt += 1) {
      try {
        return await this.once(request, body, timeoutMs);
      } catch (error) {
        if (!(error instanceof Retryable)) throw error;
        last = error;
      }
      if (attempt < this.attempts) {
        await sleep(delay);
        delay = Math.min(delay * 2, 1000);
      }
    }
    const name = className(command.type);
    const error = (last as Retryable).error;
    if (error?.code === "STORE_UNAVAILABLE") {
      throw new StoreUnavailable(
        `${name} refused ${this.attempts} times, the coordinator's store is unavailable: ${error.message}`,
        error,
      );
    }
    throw new CoordinatorUnavailable(
      `${name} got no reply after ${this.attempts} attempts: ${(last as Error).message}`,
    );
  }

  private async once(request: wire.CommandRequest, body: Buffer, timeoutMs: number): Promise<Result> {
    let reply: { body: Buffer; contentType: string | undefined };
    try {
      const sessionId = "session_id" in request.command ? request.command.session_id : null;
      reply = await this.transport.request(
        this.topology.commandQueueFor(sessionId),
        {
          body,
          contentType: JSON_CONTENT_TYPE,
          messageId: request.command_id,
          userId: this.transport.user,
          type: className(request.command.type),
          persistent: false,
        },
        timeoutMs,
      );
    } catch (error) {
      if (error instanceof TimeoutError) throw new Retryable(`no reply within ${timeoutMs} ms`);
      if (error instanceof TransportError && error.retryable) throw new Retryable(error.message);
      throw error;
    }
    let decoded: wire.CommandReply;
    try {
      decoded = decodeReply(reply.body, reply.contentType);
    } catch (error) {
      if (error instanceof DecodeError) {
        throw new SdkError(`undecodable reply from the coordinator: ${error.message}`);
      }
      throw error;
    }
    if (decoded.error != null) {
      if (decoded.error.retryable) {
        throw new Retryable(`${decoded.error.code}: ${decoded.error.message}`, decoded.error);
      }
      throw new CommandFailed(decoded.error);
    }
    return decoded.result as Result;
  }

  private async expect<T extends Result["type"]>(command: Command, kind: T): Promise<ResultOf<T>> {
    const result = await this.call(command);
    if (result.type !== kind) {
      throw new SdkError(`expected ${kind}, the coordinator answered ${result.type}`);
    }
    return result as ResultOf<T>;
  }

  // -- the seed's SessionCoordinator ----------------------------------------------------

  /** Create a workflow session. The id is chosen here so a retried create cannot make two. */
  async createWorkflowSession(
    steps: string[] = [],
    config?: WorkflowConfig,
    options: { sessionId?: string } = {},
  ): Promise<WorkflowSession> {
    const sessionId = options.sessionId ?? randomUUID();
    await this.expect(
      {
        type: "create-workflow-session",
        steps,
        config: toWireWorkflowConfig(config),
        session_id: sessionId,
      },
      "accepted",
    );
    const session = await this.getWorkflowSession(sessionId);
    if (session === null) throw new SdkError(`session ${sessionId} was created but cannot be read back`);
    return session;
  }

  /** Start CLEANUP: linked modules destroy and unlink, then the session is destroyed. */
  async destroyWorkflowSession(sessionId: string, reason?: string): Promise<void> {
    await this.expect({ type: "destroy-workflow-session", session_id: sessionId, reason: reason ?? null }, "accepted");
  }

  async getWorkflowSession(sessionId: string): Promise<WorkflowSession | null> {
    const result = await this.expect({ type: "get-workflow-session", session_id: sessionId }, "session");
    return result.session == null ? null : toWorkflowSession(result.session);
  }

  async listActiveWorkflowSessions(filter: { status?: SessionStatus; moduleId?: string } = {}): Promise<string[]> {
    const result = await this.expect(
      {
        type: "list-active-workflow-sessions",
        status: filter.status ?? null,
        module_id: filter.moduleId ?? null,
      },
      "session-ids",
    );
    return result.session_ids;
  }

  async linkModuleSession(
    workflowSessionId: string,
    moduleId: string,
    moduleSessionId: string,
    options: { config?: ModuleSessionConfig; metadata?: Record<string, unknown> } = {},
  ): Promise<void> {
    await this.expect(
      {
        type: "link-module-session",
        session_id: workflowSessionId,
        module_id: moduleId,
        module_session_id: moduleSessionId,
        config: toWireModuleSessionConfig(options.config),
        metadata: options.metadata ?? {},
      },
      "accepted",
    );
  }

  async unlinkModuleSession(workflowSessionId: string, moduleId: string, reason?: string): Promise<void> {
    await this.expect(
      { type: "unlink-module-session", session_id: workflowSessionId, module_id: moduleId, reason: reason ?? null },
      "accepted",
    );
  }

  /** moduleId -> moduleSessionId. */
  async getLinkedSessions(workflowSessionId: string): Promise<Record<string, string>> {
    const result = await this.expect({ type: "get-linked-sessions", session_id: workflowSessionId }, "linked-sessions");
    return Object.fromEntries(
      Object.entries(result.links).filter((e): e is [string, string] => e[1] !== undefined),
    );
  }

  async getCoordinatorHealth(): Promise<CoordinatorHealth> {
    return toCoordinatorHealth(await this.rawCoordinatorHealth());
  }

  async validateSessionIntegrity(sessionId: string): Promise<SessionIntegrityReport> {
    const result = await this.expect({ type: "validate-session-integrity", session_id: sessionId }, "integrity");
    return toIntegrityReport(result.report);
  }

  /** Seed: registerModule — over the bus the coordinator's registry, not an object. */
  async registerModule(
    moduleId: string,
    options: { required?: boolean; capabilities?: string[] } = {},
  ): Promise<wire.Accepted> {
    return this.expect(
      {
        type: "register-module",
        module_id: moduleId,
        required: options.required ?? true,
        capabilities: options.capabilities ?? [],
      },
      "accepted",
    );
  }

  async unregisterModule(moduleId: string, reason?: string): Promise<void> {
    await this.expect({ type: "unregister-module", module_id: moduleId, reason: reason ?? null }, "accepted");
  }

  /** Seed: getModuleSessionManager — over the bus, what the coordinator knows of it. */
  async getModule(moduleId: string): Promise<wire.ModuleInfo | null> {
    const result = await this.expect({ type: "list-modules" }, "modules");
    return result.modules.find((m) => m.module_id === moduleId) ?? null;
  }

  // -- the writes of a module's ISessionManager, and reads for the SDK ------------------

  async updateSessionStatus(
    sessionId: string,
    status: SessionStatus,
    options: { moduleId?: string; reason?: string } = {},
  ): Promise<void> {
    await this.expect(
      {
        type: "update-session-status",
        session_id: sessionId,
        status,
        module_id: options.moduleId ?? null,
        reason: options.reason ?? null,
      },
      "accepted",
    );
  }

  async recordActivity(sessionId: string, moduleId?: string): Promise<void> {
    await this.expect({ type: "record-activity", session_id: sessionId, module_id: moduleId ?? null }, "accepted");
  }

  async reportError(
    sessionId: string,
    error: StandardError,
    options: { moduleId?: string; fatal?: boolean } = {},
  ): Promise<void> {
    await this.expect(
      {
        type: "report-error",
        session_id: sessionId,
        error: toWireStandardError(error),
        module_id: options.moduleId ?? null,
        fatal: options.fatal ?? true,
      },
      "accepted",
    );
  }

  async rawCoordinatorHealth(): Promise<wire.CoordinatorHealth> {
    return (await this.expect({ type: "get-coordinator-health" }, "health")).health;
  }

  /** Every session not destroyed, with full state (wire form), page by page: each
   * page after the last one's key (creation time, id), so a session destroyed between
   * two pages shifts no live one past the next page. */
  async listWorkflowSessions(pageSize = 500): Promise<wire.WorkflowSession[]> {
    return (await this.snapshotWorkflowSessions(pageSize)).sessions;
  }

  /** The listing and `position`, the store position its first page reflected: an
   * event at or before it of a session not listed belongs to a session destroyed by
   * the time its page was read (the Python client's `snapshot_workflow_sessions`). */
  async snapshotWorkflowSessions(
    pageSize = 500,
  ): Promise<{ sessions: wire.WorkflowSession[]; position: number }> {
    const sessions: wire.WorkflowSession[] = [];
    let position: number | null = null;
    let after: wire.SessionsCursor | null = null;
    let offset = 0;
    for (;;) {
      const page: ResultOf<"sessions"> = await this.expect(
        { type: "list-workflow-sessions", offset, after, limit: pageSize },
        "sessions",
      );
      position ??= page.position ?? 0;
      sessions.push(...page.sessions);
      if (page.next_after) {
        after = page.next_after;
      } else if (page.next_offset != null && after === null) {
        offset = page.next_offset; // a coordinator that pages by offset only
      } else {
        return { sessions, position };
      }
    }
  }

  /** Every event of one session (wire form), and the state they add up to. */
  async getSessionHistory(sessionId: string): Promise<wire.SessionHistory> {
    return this.expect({ type: "get-session-history", session_id: sessionId }, "history");
  }
}
