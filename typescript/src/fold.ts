/**
 * How a session's events add up to its state: the Python `contracts.fold.fold_session`,
 * on the wire types, so the TypeScript projection cannot disagree with the
 * coordinator's on what a history means.
 */
import { ValidationError } from "./errors.js";
import type { EventEnvelope, ModuleSessionInfo, WorkflowSession } from "./generated/wire.js";
import { SessionStatus } from "./status.js";

/** Modules whose linked session id the seed surfaces on WorkflowSession itself. */
export const LINKED_ID_FIELDS = {
  executor: "executor_session_id",
  "executor-streamer": "stream_id",
  "ai-integration": "ai_connection_id",
} as const;

type LinkedField = (typeof LINKED_ID_FIELDS)[keyof typeof LINKED_ID_FIELDS];

function linkedField(moduleId: string): LinkedField | undefined {
  return Object.hasOwn(LINKED_ID_FIELDS, moduleId)
    ? LINKED_ID_FIELDS[moduleId as keyof typeof LINKED_ID_FIELDS]
    : undefined;
}

/** Apply one event to a session's state (`null` before its first event). Throws
 * `ValidationError` when the event cannot follow the state. */
export function foldSession(state: WorkflowSession | null, env: EventEnvelope): WorkflowSession {
  const event = env.event;
  const at = env.occurred_at;
  if (state === null) {
    if (event.type !== "session.created" || env.version !== 1) {
      throw new ValidationError(
        `session ${env.session_id} must start with session.created at version 1, ` +
          `got ${event.type} at version ${env.version}`,
        "event",
      );
    }
    return {
      session_id: env.session_id,
      status: SessionStatus.INITIALIZING,
      created_at: at,
      last_activity: at,
      status_changed_at: at,
      steps: [...(event.steps ?? [])],
      required_modules: [...(event.required_modules ?? [])],
      metadata: { ...(event.config?.metadata ?? {}) },
      config: event.config ?? {},
      modules: {},
      version: 1,
      destroyed: false,
      failure: null,
      executor_session_id: null,
      stream_id: null,
      ai_connection_id: null,
    };
  }
  if (env.session_id.toLowerCase() !== state.session_id.toLowerCase()) {
    throw new ValidationError(
      `event of session ${env.session_id} applied to session ${state.session_id}`,
      "session_id",
    );
  }
  const version = state.version ?? 0;
  if (env.version !== version + 1) {
    throw new ValidationError(
      `session ${state.session_id} is at version ${version}; ` +
        `event version ${env.version} does not follow`,
      "version",
    );
  }
  const modules = { ...(state.modules ?? {}) };
  switch (event.type) {
    case "session.status-changed": {
      if (event.module_id == null) {
        return {
          ...state,
          status: event.new_status,
          status_changed_at: at,
          last_activity: at,
          failure: event.new_status === SessionStatus.FAILED ? (event.error ?? null) : state.failure,
          version: env.version,
        };
      }
      const info = modules[event.module_id];
      if (info !== undefined) {
        modules[event.module_id] = { ...info, status: event.new_status, last_activity: at };
      }
      return { ...state, modules, last_activity: at, version: env.version };
    }
    case "session.linked": {
      const info: ModuleSessionInfo = {
        module_id: event.module_id,
        session_id: event.module_session_id,
        linked_workflow_session_id: state.session_id,
        status: SessionStatus.ACTIVE,
        created_at: at,
        last_activity: at,
        metadata: { ...(event.metadata ?? {}) },
        config: event.config ?? {},
      };
      modules[event.module_id] = info;
      const next: WorkflowSession = { ...state, modules, last_activity: at, version: env.version };
      const field = linkedField(event.module_id);
      if (field !== undefined) next[field] = event.module_session_id;
      return next;
    }
    case "session.unlinked": {
      delete modules[event.module_id];
      const next: WorkflowSession = { ...state, modules, last_activity: at, version: env.version };
      const field = linkedField(event.module_id);
      if (field !== undefined) next[field] = null;
      return next;
    }
    case "session.activity-recorded": {
      const info = event.module_id == null ? undefined : modules[event.module_id];
      if (info !== undefined && event.module_id != null) {
        modules[event.module_id] = { ...info, last_activity: at };
        return { ...state, modules, last_activity: at, version: env.version };
      }
      return { ...state, last_activity: at, version: env.version };
    }
    case "session.error-reported":
      return { ...state, version: env.version };
    case "session.destroyed":
      return {
        ...state,
        destroyed: true,
        modules: {},
        version: env.version,
        executor_session_id: null,
        stream_id: null,
        ai_connection_id: null,
      };
    default:
      throw new ValidationError(
        `event type ${event.type} does not belong to a workflow session`,
        "event.type",
      );
  }
}
