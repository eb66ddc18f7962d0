/** The unified status enum, its transition table and the seed's legacy mappings. */

/** Single source of truth for session status values (seed: SessionStatus). */
export enum SessionStatus {
  INITIALIZING = "INITIALIZING",
  ACTIVE = "ACTIVE",
  PAUSED = "PAUSED",
  COMPLETED = "COMPLETED",
  FAILED = "FAILED",
  CANCELLED = "CANCELLED",
  CLEANUP = "CLEANUP",
}

/** Legacy module statuses -> SessionStatus, exactly as the seed gives them. */
export const STATUS_MAPPINGS = {
  // AI Integration ConnectionStatus -> SessionStatus
  DISCONNECTED: SessionStatus.FAILED,
  CONNECTING: SessionStatus.INITIALIZING,
  CONNECTED: SessionStatus.ACTIVE,
  ERROR: SessionStatus.FAILED,
  RATE_LIMITED: SessionStatus.PAUSED,
  // Executor ExecutionStatus -> SessionStatus (COMPLETED, FAILED remain the same)
  PENDING: SessionStatus.INITIALIZING,
  IN_PROGRESS: SessionStatus.ACTIVE,
  SKIPPED: SessionStatus.CANCELLED,
} as const satisfies Record<string, SessionStatus>;

const S = SessionStatus;

/** Allowed moves out of each status (CLEANUP ends in a Destroyed event). */
export const TRANSITIONS: Readonly<Record<SessionStatus, readonly SessionStatus[]>> = {
  [S.INITIALIZING]: [S.ACTIVE, S.FAILED, S.CANCELLED, S.CLEANUP],
  [S.ACTIVE]: [S.PAUSED, S.COMPLETED, S.FAILED, S.CANCELLED, S.CLEANUP],
  [S.PAUSED]: [S.ACTIVE, S.FAILED, S.CANCELLED, S.CLEANUP],
  [S.COMPLETED]: [S.CLEANUP],
  [S.FAILED]: [S.CLEANUP],
  [S.CANCELLED]: [S.CLEANUP],
  [S.CLEANUP]: [],
};

/** Sessions "in flight": what `healthCheck` counts as active. */
export const ACTIVE_STATUSES: ReadonlySet<SessionStatus> = new Set([
  S.INITIALIZING,
  S.ACTIVE,
  S.PAUSED,
]);

/** Whether `oldStatus -> newStatus` is allowed (setting the current status again is). */
export function canTransition(oldStatus: SessionStatus, newStatus: SessionStatus): boolean {
  return oldStatus === newStatus || TRANSITIONS[oldStatus].includes(newStatus);
}

/** A legacy ConnectionStatus / ExecutionStatus value, or a SessionStatus name. */
export function mapLegacyStatus(value: string): SessionStatus {
  if (Object.hasOwn(STATUS_MAPPINGS, value)) {
    return STATUS_MAPPINGS[value as keyof typeof STATUS_MAPPINGS];
  }
  if ((Object.values(S) as string[]).includes(value)) return value as SessionStatus;
  throw new RangeError(`unknown status ${JSON.stringify(value)}`);
}
