/**
 * @sessionbus/module-sdk — a sessionbus module in TypeScript: the seed's
 * ISessionManager on the same RabbitMQ wire as the Python SDK.
 */
export { CoordinatorClient, type ClientOptions, type Command, type Result } from "./client.js";
export { decode, decodeEnvelope, decodeReply, encode, validate } from "./codec.js";
export { deadLetter, EventConsumer, type ConsumerStats } from "./consumer.js";
export {
  CommandFailed,
  CoordinatorUnavailable,
  DecodeError,
  MessageTooLarge,
  SdkError,
  StoreUnavailable,
  TransportError,
  ValidationError,
} from "./errors.js";
export { foldSession, LINKED_ID_FIELDS } from "./fold.js";
export type * as wire from "./generated/wire.js";
export { SessionManager, type SessionManagerOptions } from "./manager.js";
export {
  ACTIVE_STATUSES,
  canTransition,
  mapLegacyStatus,
  SessionStatus,
  STATUS_MAPPINGS,
  TRANSITIONS,
} from "./status.js";
export {
  DEFAULT_PREFIX,
  DELIVERY_LIMIT,
  HEADERS,
  MODULE_ROUTING_KEYS,
  REGISTRY_ID,
  Topology,
  type QueueSpec,
} from "./topology.js";
export { AmqpTransport, type Delivery, type OutgoingMessage, type TransportOptions } from "./transport.js";
export type {
  CoordinatorHealth,
  ISessionManager,
  ModuleSessionConfig,
  ModuleSessionInfo,
  SessionIntegrityReport,
  SessionLifecycleCallbacks,
  SessionManagerHealth,
  StandardError,
  WorkflowConfig,
  WorkflowSession,
} from "./types.js";
