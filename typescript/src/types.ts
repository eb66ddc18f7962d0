/**
 * The seed's TypeScript interfaces, spelled as the seed spells them, and the
 * conversions from the wire's snake_case messages (src/generated/wire.ts) to them.
 */
import type * as wire from "./generated/wire.js";
import type { SessionStatus } from "./status.js";

/** Seed: StandardError — an error as data with a stable code. */
export interface StandardError {
  code: wire.ErrorCode;
  message: string;
  moduleId?: string | null;
  field?: string | null;
  retryable?: boolean;
  details?: Record<string, unknown>;
}

/** Seed: WorkflowSession (the primary session entity), with its linked module sessions. */
export interface WorkflowSession {
  sessionId: string;
  executorSessionId: string | null;
  streamId?: string | null;
  aiConnectionId: string | null;
  createdAt: Date;
  lastActivity: Date;
  status: SessionStatus;
  metadata?: Record<string, any>;
  steps: string[];
  modules: Record<string, ModuleSessionInfo>;
  version: number;
}

/** Seed: ModuleSessionInfo. */
export interface ModuleSessionInfo {
  moduleId: string;
  sessionId: string;
  linkedWorkflowSessionId: string;
  status: SessionStatus;
  createdAt: Date;
  lastActivity: Date;
  metadata?: Record<string, any>;
}

/** Seed: ModuleSessionConfig. `timeoutMs` is an inactivity timeout the coordinator
 * enforces; `retryAttempts` bounds the SDK's retries of the module's create hook. */
export interface ModuleSessionConfig {
  timeoutMs?: number;
  retryAttempts?: number;
  metadata?: Record<string, any>;
}

/** Seed: WorkflowConfig (the coordinator's options of a workflow session). */
export interface WorkflowConfig {
  timeoutMs?: number;
  linkTimeoutMs?: number;
  cleanupTimeoutMs?: number;
  requiredModules?: string[];
  moduleConfigs?: Record<string, ModuleSessionConfig>;
  metadata?: Record<string, any>;
}

/** Seed: SessionLifecycleCallbacks. */
export interface SessionLifecycleCallbacks {
  onSessionCreated?(moduleId: string, workflowSessionId: string, moduleSessionId: string): Promise<void>;
  onSessionStatusChanged?(
    moduleId: string,
    workflowSessionId: string,
    oldStatus: SessionStatus,
    newStatus: SessionStatus,
  ): Promise<void>;
  onSessionDestroyed?(moduleId: string, workflowSessionId: string): Promise<void>;
  onSessionError?(moduleId: string, workflowSessionId: string, error: StandardError): Promise<void>;
}

/** Seed: SessionManagerHealth. */
export interface SessionManagerHealth {
  moduleId: string;
  isHealthy: boolean;
  activeSessions: number;
  totalSessions: number;
  errors: StandardError[];
  lastHealthCheck: Date;
}

/** Seed: ISessionManager — the interface every module implements. */
export interface ISessionManager {
  readonly moduleId: string;

  // Core Lifecycle (standardized signatures)
  createSession(workflowSessionId: string, config?: ModuleSessionConfig): Promise<string>;
  destroySession(workflowSessionId: string): Promise<void>;
  getSession(workflowSessionId: string): ModuleSessionInfo | null;
  sessionExists(workflowSessionId: string): boolean;

  // Status Management
  updateSessionStatus(workflowSessionId: string, status: SessionStatus): Promise<void>;
  getSessionStatus(workflowSessionId: string): SessionStatus | null;

  // Activity Tracking
  recordActivity(workflowSessionId: string): Promise<void>;
  getLastActivity(workflowSessionId: string): Date | null;

  // Lifecycle Callbacks
  setLifecycleCallbacks(callbacks: SessionLifecycleCallbacks): void;

  // Module Health
  healthCheck(): Promise<SessionManagerHealth>;
}

/** Seed: CoordinatorHealth. */
export interface CoordinatorHealth {
  totalWorkflowSessions: number;
  activeWorkflowSessions: number;
  registeredModules: string[];
  moduleHealthStatus: Record<string, boolean>;
  lastHealthCheck: Date;
}

/** Seed: SessionIntegrityReport. */
export interface SessionIntegrityReport {
  workflowSessionId: string;
  isValid: boolean;
  linkedModules: string[];
  missingLinks: string[];
  orphanedSessions: Record<string, string>;
  inconsistentStatuses: Record<string, SessionStatus>;
  recommendations: string[];
}

// -- wire -> seed ---------------------------------------------------------------------

export function toStandardError(e: wire.StandardError): StandardError {
  return {
    code: e.code,
    message: e.message,
    moduleId: e.module_id ?? null,
    field: e.field ?? null,
    retryable: e.retryable ?? false,
    details: e.details ?? {},
  };
}

export function toWireStandardError(e: StandardError): wire.StandardError {
  const out: wire.StandardError = { code: e.code, message: e.message };
  if (e.moduleId != null) out.module_id = e.moduleId;
  if (e.field != null) out.field = e.field;
  if (e.retryable) out.retryable = true;
  if (e.details && Object.keys(e.details).length > 0) out.details = e.details;
  return out;
}

export function toModuleSessionInfo(info: wire.ModuleSessionInfo): ModuleSessionInfo {
  return {
    moduleId: info.module_id,
    sessionId: info.session_id,
    linkedWorkflowSessionId: info.linked_workflow_session_id,
    status: info.status as SessionStatus,
    createdAt: new Date(info.created_at),
    lastActivity: new Date(info.last_activity),
    metadata: info.metadata ?? {},
  };
}

export function toWorkflowSession(s: wire.WorkflowSession): WorkflowSession {
  const modules: Record<string, ModuleSessionInfo> = {};
  for (const [id, info] of Object.entries(s.modules ?? {})) {
    if (info !== undefined) modules[id] = toModuleSessionInfo(info);
  }
  return {
    sessionId: s.session_id,
    executorSessionId: s.executor_session_id ?? null,
    streamId: s.stream_id ?? null,
    aiConnectionId: s.ai_connection_id ?? null,
    createdAt: new Date(s.created_at),
    lastActivity: new Date(s.last_activity),
    status: s.status as SessionStatus,
    metadata: s.metadata ?? {},
    steps: s.steps ?? [],
    modules,
    version: s.version ?? 0,
  };
}

export function toWireModuleSessionConfig(c: ModuleSessionConfig = {}): wire.ModuleSessionConfig {
  const out: wire.ModuleSessionConfig = {};
  if (c.timeoutMs !== undefined) out.timeout_ms = c.timeoutMs;
  if (c.retryAttempts !== undefined) out.retry_attempts = c.retryAttempts;
  if (c.metadata && Object.keys(c.metadata).length > 0) out.metadata = c.metadata;
  return out;
}

export function fromWireModuleSessionConfig(c: wire.ModuleSessionConfig = {}): ModuleSessionConfig {
  const out: ModuleSessionConfig = { metadata: c.metadata ?? {} };
  if (c.timeout_ms != null) out.timeoutMs = c.timeout_ms;
  if (c.retry_attempts != null) out.retryAttempts = c.retry_attempts;
  return out;
}

export function toWireWorkflowConfig(c: WorkflowConfig = {}): wire.WorkflowConfig {
  const out: wire.WorkflowConfig = {};
  if (c.timeoutMs !== undefined) out.timeout_ms = c.timeoutMs;
  if (c.linkTimeoutMs !== undefined) out.link_timeout_ms = c.linkTimeoutMs;
  if (c.cleanupTimeoutMs !== undefined) out.cleanup_timeout_ms = c.cleanupTimeoutMs;
  if (c.requiredModules !== undefined) out.required_modules = c.requiredModules;
  if (c.moduleConfigs !== undefined) {
    out.module_configs = Object.fromEntries(
      Object.entries(c.moduleConfigs).map(([k, v]) => [k, toWireModuleSessionConfig(v)]),
    );
  }
  if (c.metadata !== undefined) out.metadata = c.metadata;
  return out;
}

export function toCoordinatorHealth(h: wire.CoordinatorHealth): CoordinatorHealth {
  return {
    totalWorkflowSessions: h.total_workflow_sessions,
    activeWorkflowSessions: h.active_workflow_sessions,
    registeredModules: h.registered_modules,
    moduleHealthStatus: Object.fromEntries(
      Object.entries(h.module_health_status).filter((e): e is [string, boolean] => e[1] !== undefined),
    ),
    lastHealthCheck: new Date(h.last_health_check),
  };
}

export function toIntegrityReport(r: wire.SessionIntegrityReport): SessionIntegrityReport {
  const defined = <T>(o: Record<string, T | undefined> | undefined): Record<string, T> =>
    Object.fromEntries(Object.entries(o ?? {}).filter((e): e is [string, T] => e[1] !== undefined));
  return {
    workflowSessionId: r.workflow_session_id,
    isValid: r.is_valid,
    linkedModules: r.linked_modules ?? [],
    missingLinks: r.missing_links ?? [],
    orphanedSessions: defined(r.orphaned_sessions),
    inconsistentStatuses: defined(r.inconsistent_statuses) as Record<string, SessionStatus>,
    recommendations: r.recommendations ?? [],
  };
}
