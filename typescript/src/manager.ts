/**
 * `SessionManager`: the seed's ISessionManager for one module, on the bus — the
 * Python `module_sdk.SessionManager`, on the same wire.
 *
 * A module extends it, sets `moduleId` and writes two hooks: `onCreate` (make the
 * module's own session for a workflow session) and `onDestroy` (tear it down). The
 * manager registers the module, keeps a local projection of every session from the
 * events it consumes (so reads are synchronous and local), and calls the hooks when
 * the coordinator's events ask for them: a new workflow session → create and link;
 * CLEANUP → destroy and unlink; an orphan clean-up request → destroy. Writes go to
 * the coordinator (seed rule 3). Lifecycle callbacks are always wired (rule 5).
 *
 * History is never replayed as side effects: on start the manager lists every live
 * session and reacts to each state once; afterwards an event of a session not listed
 * from before the listing (one destroyed meanwhile), or one past a gap, brings its
 * session up to date from the coordinator's history — folded as a whole, then reacted
 * to once. So a
 * restarted module never runs `onCreate` for a session destroyed meanwhile, never
 * runs `onDestroy` twice, and never tries to link to a destroyed session.
 */
import { randomUUID } from "node:crypto";
import { CoordinatorClient } from "./client.js";
import { encode, JSON_CONTENT_TYPE, prepareValidators } from "./codec.js";
import { EventConsumer, type Projection } from "./consumer.js";
import { CommandFailed, CoordinatorUnavailable, SdkError, TransportError } from "./errors.js";
import { foldSession } from "./fold.js";
import type * as wire from "./generated/wire.js";
import { ACTIVE_STATUSES, SessionStatus } from "./status.js";
import { parseModuleId, REGISTRY_ID, Topology } from "./topology.js";
import { AmqpTransport } from "./transport.js";
import {
  fromWireModuleSessionConfig,
  type ISessionManager,
  type ModuleSessionConfig,
  type ModuleSessionInfo,
  type SessionLifecycleCallbacks,
  type SessionManagerHealth,
  type StandardError,
  toModuleSessionInfo,
  toStandardError,
  toWireStandardError,
  toWorkflowSession,
  type WorkflowSession,
} from "./types.js";

const S = SessionStatus;
const DESTROYED_MEMORY = 100_000;
const ERROR_MEMORY = 20;

export interface SessionManagerOptions {
  moduleId?: string;
  topology?: Topology;
  /** Retries of `onCreate` / `onDestroy` after the first attempt (a session's
   * `retryAttempts` overrides it for its create). */
  retryAttempts?: number;
  clientTimeoutMs?: number;
  heartbeatIntervalMs?: number;
  /** Unacknowledged deliveries at most. */
  prefetch?: number;
  /** Sessions applied at once at most. */
  concurrency?: number;
  /** Close the transport with the manager. */
  ownTransport?: boolean;
  register?: boolean;
  required?: boolean;
  capabilities?: string[];
}

const log = {
  info: (...args: unknown[]) => {
    if (process.env.SESSIONBUS_LOG_LEVEL === "INFO" || process.env.SESSIONBUS_LOG_LEVEL === "DEBUG") {
      console.error(...args);
    }
  },
  warn: (...args: unknown[]) => console.error(...args),
};

function defaultCallbacks(): Required<SessionLifecycleCallbacks> {
  return {
    onSessionCreated: async (moduleId, wsid, msid) =>
      log.info(`${moduleId}: session ${msid} linked to workflow session ${wsid}`),
    onSessionStatusChanged: async (moduleId, wsid, oldStatus, newStatus) =>
      log.info(`${moduleId}: workflow session ${wsid} ${oldStatus} -> ${newStatus}`),
    onSessionDestroyed: async (moduleId, wsid) => log.info(`${moduleId}: workflow session ${wsid} destroyed`),
    onSessionError: async (moduleId, wsid, error) =>
      log.warn(`${moduleId}: workflow session ${wsid} error ${error.code}: ${error.message}`),
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class SessionManager implements ISessionManager {
  /** Set by a subclass (`static moduleId = "executor"`) or given as an option. */
  static moduleId = "";
  static required = true;
  static capabilities: string[] = [];

  readonly moduleId: string;
  readonly transport: AmqpTransport;
  readonly topology: Topology;
  readonly client: CoordinatorClient;
  readonly consumer: EventConsumer;
  readonly instanceId = randomUUID();
  readonly retryAttempts: number;
  readonly heartbeatIntervalMs: number;
  /** Every live session this process knows, as folded from its events. */
  readonly sessions = new Map<string, wire.WorkflowSession>();
  private readonly destroyed = new Map<string, number>();
  private readonly owned = new Map<string, string>(); // workflow session -> module session
  // A reaction cut short (a lost connection, the coordinator away) is tried again when
  // its event is redelivered. These remember a module session made whose link is not
  // confirmed yet, and one destroyed whose unlink is not, so that the retry links or
  // unlinks it instead of making or destroying another.
  private readonly madeUnlinked = new Map<string, { moduleSessionId: string; metadata: Record<string, unknown> }>();
  private readonly destroyedLinked = new Map<string, string>();
  private readonly errors: StandardError[] = [];
  /** Module sessions whose `onDestroy` ran (bounded). */
  private readonly released = new Set<string>();
  private callbacks: Required<SessionLifecycleCallbacks> = defaultCallbacks();
  private createdTotal = 0;
  /** The store position the start-up listing reflected. */
  private caughtUpAt = 0;
  /** Versions this process loaded from the coordinator on start. */
  readonly baseline = new Map<string, number>();
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private running = false;
  private closed = false;
  private readonly ownTransport: boolean;
  private readonly register: boolean;
  private readonly required: boolean;
  private readonly capabilities: string[];

  constructor(transport: AmqpTransport, options: SessionManagerOptions = {}) {
    const cls = this.constructor as typeof SessionManager;
    this.moduleId = parseModuleId(options.moduleId ?? cls.moduleId);
    this.transport = transport;
    this.topology = options.topology ?? Topology.fromEnv();
    this.retryAttempts = options.retryAttempts ?? 3;
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 5000;
    this.ownTransport = options.ownTransport ?? false;
    this.register = options.register ?? true;
    this.required = options.required ?? cls.required;
    this.capabilities = options.capabilities ?? cls.capabilities;
    this.client = new CoordinatorClient(transport, this.topology, {
      timeoutMs: options.clientTimeoutMs ?? 10_000,
    });
    const projection: Projection = {
      currentVersion: (sid) => this.version(sid),
      isHistory: (env) => env.position != null && env.position <= this.caughtUpAt,
      apply: (env) => this.apply(env),
      applyBatch: (sid, events, history) => this.applyBatch(sid, events, history),
      history: async (sid) => (await this.client.getSessionHistory(sid)).events,
    };
    this.consumer = new EventConsumer(transport, this.topology, this.moduleId, projection, {
      prefetch: options.prefetch ?? 128,
      concurrency: options.concurrency ?? 64,
    });
  }

  /** A manager on its own RabbitMQ connection (closed with the manager). The topology
   * prefix is `prefix`, else SESSIONBUS_PREFIX, else the default. */
  static connect<T extends SessionManager>(
    this: new (transport: AmqpTransport, options?: SessionManagerOptions) => T,
    url: string,
    options: SessionManagerOptions & { prefix?: string } = {},
  ): T {
    const moduleId = options.moduleId ?? (this as unknown as typeof SessionManager).moduleId;
    const name = process.env.SESSIONBUS_CONNECTION_NAME ?? `sessionbus-module-${moduleId}`;
    const transport = new AmqpTransport(url, { connectionName: name });
    const topology = options.topology ?? Topology.fromEnv(options.prefix);
    return new this(transport, { ...options, topology, ownTransport: true });
  }

  // -- hooks a module overrides ---------------------------------------------------------

  /** Create this module's own session for `session`; return its metadata. Throwing
   * fails the attempt (retried up to `retryAttempts`). */
  async onCreate(
    _session: WorkflowSession,
    _moduleSessionId: string,
    _config: ModuleSessionConfig,
  ): Promise<Record<string, unknown> | void> {
    return undefined;
  }

  /** Tear down this module's session `info.sessionId`. */
  async onDestroy(_info: ModuleSessionInfo): Promise<void> {}

  /** Whether to take part in a new workflow session (default: always). */
  shouldJoin(_session: WorkflowSession): boolean {
    return true;
  }

  // -- life cycle -----------------------------------------------------------------------

  /** Connect, declare the module queue, register, catch up, then consume. */
  async start(): Promise<this> {
    prepareValidators();
    if (this.ownTransport) await this.transport.connect();
    try {
      await this.transport.declareQueue(this.topology.moduleQueueSpec(this.moduleId));
      if (this.register) {
        await this.client.registerModule(this.moduleId, {
          required: this.required,
          capabilities: this.capabilities,
        });
      }
      await this.catchUp();
      this.caughtUp(this.baseline);
      await this.consumer.start();
    } catch (error) {
      await this.close(); // a start that failed leaves no connection behind
      throw error;
    }
    this.running = true;
    if (this.heartbeatIntervalMs > 0) this.scheduleHeartbeat(0);
    return this;
  }

  /** Stop consuming → finish running handlers (bounded) → requeue the prefetched →
   * stop heartbeats → close the connection. Safe to call twice. */
  async close(graceMs = 10_000): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.running = false;
    if (this.heartbeatTimer !== null) clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
    await this.consumer.stop(graceMs);
    if (this.ownTransport) await this.transport.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Serve until `signal` aborts (a SIGTERM handler aborts it), then close. */
  async runUntil(signal: AbortSignal): Promise<void> {
    if (!signal.aborted) {
      await new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
    }
    await this.close();
  }

  /** Load every live session from the coordinator, then reconcile: create and link
   * where this module is expected, finish clean-ups it missed. Events at or before
   * the position the listing reflected, of sessions not listed, are history. */
  protected async catchUp(): Promise<void> {
    const snapshot = await this.client.snapshotWorkflowSessions();
    this.caughtUpAt = snapshot.position;
    for (const session of snapshot.sessions) {
      this.sessions.set(session.session_id, session);
      this.baseline.set(session.session_id, session.version ?? 0);
      const info = session.modules?.[this.moduleId];
      if (info !== undefined) this.owned.set(session.session_id, info.session_id);
    }
    for (const session of [...this.sessions.values()]) {
      if (this.wantsCreate(session)) {
        // A create is a side effect (a browser, a connection): ask whether the session
        // still waits for one, not only the listing — it may have ended, or the link
        // of a previous life landed, since.
        const now = await this.client.call({ type: "get-workflow-session", session_id: session.session_id });
        const current = now.type === "session" ? now.session : null;
        if (current == null || current.destroyed || !this.wantsCreate(current)) continue;
      }
      await this.reactToState(session);
    }
  }

  /** Whether `session` waits for this module's session. `isNew`: this process never
   * saw it before, so it may join one that went ACTIVE without it. */
  private wantsCreate(session: wire.WorkflowSession, isNew = false): boolean {
    const status = session.status as SessionStatus;
    const joinable = status === S.INITIALIZING || (isNew && ACTIVE_STATUSES.has(status));
    return (
      !session.destroyed &&
      joinable &&
      session.modules?.[this.moduleId] === undefined &&
      this.shouldJoin(toWorkflowSession(session))
    );
  }

  private async reactToState(session: wire.WorkflowSession, isNew = false): Promise<void> {
    const sid = session.session_id;
    if (session.destroyed) return;
    if (session.status === S.CLEANUP && session.modules?.[this.moduleId] !== undefined) {
      await this.safe(this.destroySessionWithReason(sid, "workflow session cleanup"), sid);
    } else if (this.wantsCreate(session, isNew)) {
      await this.safe(this.createSession(sid), sid);
    }
  }

  // -- ISessionManager: lifecycle -------------------------------------------------------

  /** Create this module's session for a workflow session and link it. Returns the
   * module session id (an existing link's id if already linked). */
  async createSession(workflowSessionId: string, config?: ModuleSessionConfig): Promise<string> {
    let session = this.sessions.get(workflowSessionId) ?? null;
    if (session === null) {
      const fetched = await this.client.call({ type: "get-workflow-session", session_id: workflowSessionId });
      session = fetched.type === "session" ? (fetched.session ?? null) : null;
      if (session === null) {
        throw new CommandFailed({
          code: "UNKNOWN_SESSION",
          message: `no workflow session ${workflowSessionId}`,
          module_id: this.moduleId,
        });
      }
    }
    const existing = session.modules?.[this.moduleId];
    if (existing !== undefined) return existing.session_id;
    const effective =
      config ?? fromWireModuleSessionConfig(session.config?.module_configs?.[this.moduleId] ?? {});
    const attempts = effective.retryAttempts ?? this.retryAttempts;
    let made = this.madeUnlinked.get(workflowSessionId);
    if (made === undefined) {
      made = await this.make(session, effective, attempts);
      this.madeUnlinked.set(workflowSessionId, made);
      this.createdTotal += 1;
    }
    this.owned.set(workflowSessionId, made.moduleSessionId);
    try {
      await this.client.linkModuleSession(workflowSessionId, this.moduleId, made.moduleSessionId, {
        config: effective,
        metadata: made.metadata,
      });
    } catch (error) {
      if (error instanceof CommandFailed) {
        // The workflow session moved on (cleanup, failure) before the link: what was
        // just created belongs to nobody, so it goes.
        this.madeUnlinked.delete(workflowSessionId);
        this.owned.delete(workflowSessionId);
        await this.destroyInternal(workflowSessionId, made.moduleSessionId);
      }
      throw error;
    }
    this.madeUnlinked.delete(workflowSessionId);
    return made.moduleSessionId;
  }

  /** Run `onCreate` (retried); a final failure is reported as a fatal error. */
  private async make(
    session: wire.WorkflowSession,
    config: ModuleSessionConfig,
    attempts: number,
  ): Promise<{ moduleSessionId: string; metadata: Record<string, unknown> }> {
    const moduleSessionId = randomUUID();
    try {
      const metadata = await this.retry(attempts, () =>
        this.onCreate(toWorkflowSession(session), moduleSessionId, config),
      );
      return { moduleSessionId, metadata: { ...(metadata ?? {}) } };
    } catch (error) {
      const failure: StandardError = {
        code: "MODULE_ERROR",
        message:
          `${this.moduleId} could not create its session after ${attempts + 1} attempts: ` +
          `${(error as Error).name}: ${(error as Error).message}`,
        moduleId: this.moduleId,
      };
      this.remember(failure);
      await this.client.reportError(session.session_id, failure, { moduleId: this.moduleId, fatal: true });
      throw new SdkError(failure.message, { cause: error });
    }
  }

  /** Destroy this module's session of a workflow session and unlink it. If the
   * module's hook fails, the link stays: the coordinator's cleanup timeout then records
   * the session as orphaned rather than pretending it is gone. */
  async destroySession(workflowSessionId: string): Promise<void> {
    await this.destroySessionWithReason(workflowSessionId, null);
  }

  private async destroySessionWithReason(workflowSessionId: string, reason: string | null): Promise<void> {
    let moduleSessionId = this.owned.get(workflowSessionId);
    if (moduleSessionId === undefined) {
      moduleSessionId = this.sessions.get(workflowSessionId)?.modules?.[this.moduleId]?.session_id;
    }
    if (moduleSessionId === undefined) return;
    if (this.destroyedLinked.get(workflowSessionId) !== moduleSessionId) {
      await this.destroyInternal(workflowSessionId, moduleSessionId);
      this.destroyedLinked.set(workflowSessionId, moduleSessionId);
    }
    this.owned.delete(workflowSessionId);
    await this.client.unlinkModuleSession(workflowSessionId, this.moduleId, reason ?? undefined);
    this.destroyedLinked.delete(workflowSessionId);
  }

  private async destroyInternal(workflowSessionId: string, moduleSessionId: string): Promise<void> {
    if (this.released.has(moduleSessionId)) return; // onDestroy runs once per module session
    const info = this.info(workflowSessionId, moduleSessionId);
    try {
      await this.retry(this.retryAttempts, () => this.onDestroy(info));
    } catch (error) {
      const failure: StandardError = {
        code: "MODULE_ERROR",
        message: `${this.moduleId} could not destroy session ${moduleSessionId}: ${(error as Error).message}`,
        moduleId: this.moduleId,
      };
      this.remember(failure);
      throw new SdkError(failure.message, { cause: error });
    }
    this.released.add(moduleSessionId);
    if (this.released.size > DESTROYED_MEMORY) {
      const oldest = this.released.values().next().value;
      if (oldest !== undefined) this.released.delete(oldest);
    }
  }

  private info(workflowSessionId: string, moduleSessionId: string): ModuleSessionInfo {
    const linked = this.sessions.get(workflowSessionId)?.modules?.[this.moduleId];
    if (linked !== undefined && linked.session_id === moduleSessionId) return toModuleSessionInfo(linked);
    const now = new Date();
    return {
      moduleId: this.moduleId,
      sessionId: moduleSessionId,
      linkedWorkflowSessionId: workflowSessionId,
      status: S.CLEANUP,
      createdAt: now,
      lastActivity: now,
      metadata: {},
    };
  }

  // -- ISessionManager: reads (local, synchronous) --------------------------------------

  getSession(workflowSessionId: string): ModuleSessionInfo | null {
    const info = this.sessions.get(workflowSessionId)?.modules?.[this.moduleId];
    return info === undefined ? null : toModuleSessionInfo(info);
  }

  sessionExists(workflowSessionId: string): boolean {
    return this.sessions.get(workflowSessionId)?.modules?.[this.moduleId] !== undefined;
  }

  getSessionStatus(workflowSessionId: string): SessionStatus | null {
    const info = this.sessions.get(workflowSessionId)?.modules?.[this.moduleId];
    return info === undefined ? null : (info.status as SessionStatus);
  }

  getLastActivity(workflowSessionId: string): Date | null {
    const info = this.sessions.get(workflowSessionId)?.modules?.[this.moduleId];
    return info === undefined ? null : new Date(info.last_activity);
  }

  /** The workflow session as this process knows it (seed shape), or null. */
  getWorkflowSession(workflowSessionId: string): WorkflowSession | null {
    const session = this.sessions.get(workflowSessionId);
    return session === undefined ? null : toWorkflowSession(session);
  }

  // -- ISessionManager: writes (through the coordinator) --------------------------------

  /** This module's session status (the coordinator enforces the transition table). */
  async updateSessionStatus(workflowSessionId: string, status: SessionStatus): Promise<void> {
    await this.client.updateSessionStatus(workflowSessionId, status, { moduleId: this.moduleId });
  }

  async recordActivity(workflowSessionId: string): Promise<void> {
    await this.client.recordActivity(workflowSessionId, this.moduleId);
  }

  /** Unset callbacks keep their defaults (which log): every one is always wired. */
  setLifecycleCallbacks(callbacks: SessionLifecycleCallbacks): void {
    this.callbacks = { ...defaultCallbacks(), ...callbacks } as Required<SessionLifecycleCallbacks>;
  }

  async healthCheck(): Promise<SessionManagerHealth> {
    let active = 0;
    for (const sid of this.owned.keys()) {
      const status = this.sessions.get(sid)?.status as SessionStatus | undefined;
      if (status !== undefined && ACTIVE_STATUSES.has(status)) active += 1;
    }
    return {
      moduleId: this.moduleId,
      isHealthy: this.running && this.transport.isConnected,
      activeSessions: active,
      totalSessions: this.createdTotal,
      errors: [...this.errors],
      lastHealthCheck: new Date(),
    };
  }

  /** How many module sessions this process created. */
  get createdCount(): number {
    return this.createdTotal;
  }

  // -- applying events ------------------------------------------------------------------

  private version(sessionId: string): number {
    const session = this.sessions.get(sessionId);
    if (session !== undefined) return session.version ?? 0;
    return this.destroyed.get(sessionId) ?? 0;
  }

  private store(state: wire.WorkflowSession): void {
    const sid = state.session_id;
    if (state.destroyed) {
      this.sessions.delete(sid);
      this.destroyed.set(sid, state.version ?? 0);
      if (this.destroyed.size > DESTROYED_MEMORY) {
        const oldest = this.destroyed.keys().next().value;
        if (oldest !== undefined) this.destroyed.delete(oldest);
      }
    } else {
      this.sessions.set(sid, state);
    }
  }

  /** Not applied (the reaction failed): put the local state back, or the redelivery
   * would be taken for a duplicate and the reaction never run. */
  private restore(sid: string, before: wire.WorkflowSession | null): void {
    this.destroyed.delete(sid);
    if (before === null) this.sessions.delete(sid);
    else this.sessions.set(sid, before);
  }

  /** Hook for a subclass that journals (tests): the versions learnt from the
   * coordinator rather than applied one by one — on start, before anything is
   * consumed, and again when a session is brought up to date from history. */
  protected caughtUp(_baseline: ReadonlyMap<string, number>): void {}

  /** Hook for a subclass that journals (tests): called once per event applied. */
  protected applied(_env: wire.EventEnvelope): void {}

  private async apply(env: wire.EventEnvelope): Promise<void> {
    if (env.session_id === REGISTRY_ID) {
      await this.applyRegistry(env);
      this.applied(env);
      return;
    }
    const sid = env.session_id;
    const before = this.sessions.get(sid) ?? null;
    const state = foldSession(before, env);
    this.store(state);
    try {
      await this.react(env, before, state);
    } catch (error) {
      this.restore(sid, before);
      throw error;
    }
    this.applied(env);
  }

  /** Fold every event first, then react once to where they lead. A session learnt
   * from history joins the baseline (its events were not applied one by one). */
  private async applyBatch(sid: string, events: wire.EventEnvelope[], history: boolean): Promise<void> {
    const before = this.sessions.get(sid) ?? null;
    let state = before;
    for (const env of events) state = foldSession(state, env);
    if (state === null) return;
    this.store(state);
    try {
      await this.reactOnce(sid, events, before, state);
    } catch (error) {
      this.restore(sid, before);
      throw error;
    }
    if (history) {
      this.baseline.set(sid, state.version ?? 0);
      this.caughtUp(this.baseline);
    } else {
      for (const env of events) this.applied(env);
    }
  }

  /** React once to where a run of past events left a session, never to each (as the
   * Python SDK's `_react_to_history`). */
  private async reactOnce(
    sid: string,
    events: wire.EventEnvelope[],
    before: wire.WorkflowSession | null,
    state: wire.WorkflowSession,
  ): Promise<void> {
    const cb = this.callbacks;
    const previous = before?.modules?.[this.moduleId];
    if (state.destroyed) {
      // Release what this process still holds for it (a module session made and
      // never linked, or linked and never unlinked), once; nothing new is made.
      const held = new Set(
        [this.owned.get(sid), this.madeUnlinked.get(sid)?.moduleSessionId].filter(
          (id): id is string => id !== undefined,
        ),
      );
      this.owned.delete(sid);
      this.madeUnlinked.delete(sid);
      this.destroyedLinked.delete(sid);
      for (const id of held) await this.safe(this.destroyInternal(sid, id), sid);
      if (before !== null || held.size > 0) {
        await this.callback(() => cb.onSessionDestroyed(this.moduleId, sid));
      }
      return;
    }
    const mine = state.modules?.[this.moduleId];
    const owned = this.owned.get(sid);
    if (mine !== undefined) {
      this.owned.set(sid, mine.session_id);
      const made = this.madeUnlinked.get(sid);
      if (made !== undefined && made.moduleSessionId === mine.session_id) this.madeUnlinked.delete(sid);
      if (previous?.session_id !== mine.session_id) {
        await this.callback(() => cb.onSessionCreated(this.moduleId, sid, mine.session_id));
      }
    } else if (previous !== undefined && owned === previous.session_id) {
      // Unlinked by someone else (integrity repair): release what we hold.
      this.owned.delete(sid);
      await this.safe(this.destroyInternal(sid, previous.session_id), sid);
    }
    const old = (before?.status ?? S.INITIALIZING) as SessionStatus;
    if (state.status !== old) {
      await this.callback(() => cb.onSessionStatusChanged(this.moduleId, sid, old, state.status as SessionStatus));
    }
    for (const env of events) {
      if (env.event.type === "session.error-reported") {
        const event = env.event;
        await this.callback(() =>
          cb.onSessionError(event.module_id ?? this.moduleId, sid, toStandardError(event.error)),
        );
      }
    }
    await this.reactToState(state, before === null);
  }

  private async react(
    env: wire.EventEnvelope,
    before: wire.WorkflowSession | null,
    state: wire.WorkflowSession,
  ): Promise<void> {
    const event = env.event;
    const sid = env.session_id;
    const cb = this.callbacks;
    switch (event.type) {
      case "session.created":
        if (this.shouldJoin(toWorkflowSession(state))) await this.safe(this.createSession(sid), sid);
        break;
      case "session.linked":
        if (event.module_id === this.moduleId) {
          this.owned.set(sid, event.module_session_id);
          const made = this.madeUnlinked.get(sid);
          if (made !== undefined && made.moduleSessionId === event.module_session_id) {
            this.madeUnlinked.delete(sid); // its link is confirmed after all
          }
          await this.callback(() => cb.onSessionCreated(this.moduleId, sid, event.module_session_id));
        }
        break;
      case "session.status-changed":
        if (event.module_id == null || event.module_id === this.moduleId) {
          await this.callback(() =>
            cb.onSessionStatusChanged(
              this.moduleId,
              sid,
              event.old_status as SessionStatus,
              event.new_status as SessionStatus,
            ),
          );
        }
        if (event.module_id == null && event.new_status === S.CLEANUP && state.modules?.[this.moduleId]) {
          await this.safe(this.destroySessionWithReason(sid, "workflow session cleanup"), sid);
        }
        break;
      case "session.unlinked":
        if (event.module_id === this.moduleId && this.owned.get(sid) === event.module_session_id) {
          // Unlinked by someone else (integrity repair): release what we hold.
          this.owned.delete(sid);
          await this.safe(this.destroyInternal(sid, event.module_session_id), sid);
        }
        break;
      case "session.error-reported":
        await this.callback(() =>
          cb.onSessionError(event.module_id ?? this.moduleId, sid, toStandardError(event.error)),
        );
        break;
      case "session.destroyed": {
        const orphaned = event.orphaned?.[this.moduleId];
        if (orphaned !== undefined && this.owned.get(sid) === orphaned) {
          this.owned.delete(sid);
          await this.safe(this.destroyInternal(sid, orphaned), sid);
        }
        this.destroyedLinked.delete(sid);
        const made = this.madeUnlinked.get(sid);
        this.madeUnlinked.delete(sid);
        if (made !== undefined) {
          // made, never linked, and now it never will be
          this.owned.delete(sid);
          await this.safe(this.destroyInternal(sid, made.moduleSessionId), sid);
        }
        await this.callback(() => cb.onSessionDestroyed(this.moduleId, sid));
        break;
      }
      default:
        break;
    }
    void before;
  }

  private async applyRegistry(env: wire.EventEnvelope): Promise<void> {
    const event = env.event;
    if (event.type === "module.orphan-cleanup-requested" && event.module_id === this.moduleId) {
      this.owned.delete(event.workflow_session_id);
      await this.safe(
        this.destroyInternal(event.workflow_session_id, event.module_session_id),
        event.workflow_session_id,
      );
    }
  }

  // -- plumbing -------------------------------------------------------------------------

  private async retry<T>(attempts: number, call: () => Promise<T>): Promise<T> {
    let delay = 50;
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await call();
      } catch (error) {
        if (attempt >= Math.max(0, attempts)) throw error;
        await sleep(delay);
        delay = Math.min(delay * 2, 2000);
      }
    }
  }

  /** Run a reaction whose failure is already reported (or is the coordinator's
   * refusal, e.g. a session that moved on): log it, do not stop the consumer. A
   * coordinator that does not answer is not a refusal: the event is requeued. */
  private async safe(work: Promise<unknown>, sessionId: string): Promise<void> {
    try {
      await work;
    } catch (error) {
      if (error instanceof CoordinatorUnavailable) throw error;
      if (error instanceof SdkError) {
        log.warn(`${this.moduleId}: session ${sessionId}: ${error.message}`);
        return;
      }
      throw error;
    }
  }

  private async callback(call: () => Promise<void>): Promise<void> {
    try {
      await call();
    } catch (error) {
      log.warn(`${this.moduleId}: lifecycle callback failed:`, error);
    }
  }

  private remember(error: StandardError): void {
    this.errors.push(error);
    if (this.errors.length > ERROR_MEMORY) this.errors.shift();
  }

  private scheduleHeartbeat(delayMs: number): void {
    this.heartbeatTimer = setTimeout(() => {
      void this.heartbeat().finally(() => {
        if (this.running) this.scheduleHeartbeat(this.heartbeatIntervalMs);
      });
    }, delayMs);
    this.heartbeatTimer.unref();
  }

  private async heartbeat(): Promise<void> {
    const health = await this.healthCheck();
    const intervalMs = Math.max(1, Math.round(this.heartbeatIntervalMs));
    const heartbeat: wire.Heartbeat = {
      module_id: this.moduleId,
      instance_id: this.instanceId,
      sent_at: new Date().toISOString(),
      interval_ms: intervalMs,
      health: {
        module_id: health.moduleId,
        is_healthy: health.isHealthy,
        active_sessions: health.activeSessions,
        total_sessions: health.totalSessions,
        last_health_check: health.lastHealthCheck.toISOString(),
        errors: health.errors.map(toWireStandardError),
      },
    };
    try {
      await this.transport.publish(this.topology.heartbeatsExchange, "", {
        body: encode(heartbeat),
        contentType: JSON_CONTENT_TYPE,
        userId: this.transport.user,
        persistent: false,
        expirationMs: intervalMs * 3,
      });
    } catch (error) {
      if (!(error instanceof TransportError)) throw error;
    }
  }
}
