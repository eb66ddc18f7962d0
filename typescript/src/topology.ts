/**
 * Names of every exchange, queue and header, derived from one prefix — the same as
 * the Python `contracts.topology` (a test compares them with the exported AsyncAPI
 * document's).
 */

export const DEFAULT_PREFIX = "sessionbus";
/** What a module's queue receives: every session event and orphan clean-up requests. */
export const MODULE_ROUTING_KEYS = ["session.#", "module.orphan-cleanup-requested"] as const;
/** Redeliveries before a quorum queue dead-letters a message that keeps failing. */
export const DELIVERY_LIMIT = 10;
export const PREFIX_PATTERN = /^[a-z][a-z0-9_-]{0,62}$/;
export const MODULE_ID_PATTERN = /^[a-z][a-z0-9]*(-[a-z0-9]+)*$/;
/** The module registry's stream id: uuid5(NAMESPACE_URL, "urn:sessionbus:module-registry"). */
export const REGISTRY_ID = "c6805b03-1787-5ba2-b4d8-6c79e7025cdb";
export const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

/** AMQP header names carried by sessionbus messages. */
export const HEADERS = {
  SCHEMA_VERSION: "x-sessionbus-schema",
  SESSION_ID: "x-session-id",
  VERSION: "x-session-version",
  POSITION: "x-position",
  TRACEPARENT: "traceparent",
  TRACESTATE: "tracestate",
  REJECT_REASON: "x-sessionbus-reject-reason",
  REJECT_CODE: "x-sessionbus-reject-code",
  REJECT_FIELD: "x-sessionbus-reject-field",
  REJECTED_BY: "x-sessionbus-rejected-by",
} as const;

export interface QueueSpec {
  name: string;
  arguments: Record<string, unknown>;
  bindings: Array<[exchange: string, routingKey: string]>;
}

export function parseModuleId(value: string): string {
  if (value.length > 64 || !MODULE_ID_PATTERN.test(value)) {
    throw new RangeError(
      `module_id must be lower-case kebab case (e.g. 'task-loop'), got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

/** All broker names for one prefix (one command partition, as the Python default). */
export class Topology {
  readonly prefix: string;

  constructor(prefix: string = DEFAULT_PREFIX) {
    if (!PREFIX_PATTERN.test(prefix)) {
      throw new RangeError(`topology prefix must match ${PREFIX_PATTERN.source}, got ${prefix}`);
    }
    this.prefix = prefix;
  }

  /** The prefix given, else SESSIONBUS_PREFIX, else the default. */
  static fromEnv(prefix?: string): Topology {
    return new Topology(prefix || process.env.SESSIONBUS_PREFIX || DEFAULT_PREFIX);
  }

  get eventsExchange(): string {
    return `${this.prefix}.events`;
  }
  get heartbeatsExchange(): string {
    return `${this.prefix}.heartbeats`;
  }
  get deadLetterExchange(): string {
    return `${this.prefix}.dlx`;
  }
  get deadLetterQueue(): string {
    return `${this.prefix}.dlq`;
  }
  get commandsQueue(): string {
    return `${this.prefix}.commands`;
  }
  moduleQueue(moduleId: string): string {
    return `${this.prefix}.module.${parseModuleId(moduleId)}`;
  }

  /** A module's events: quorum, dead-lettered, single active consumer so one replica
   * at a time sees a session's events, in order. Declared with exactly the Python
   * SDK's arguments (RabbitMQ refuses a redeclaration that differs). */
  moduleQueueSpec(moduleId: string): QueueSpec {
    return {
      name: this.moduleQueue(moduleId),
      arguments: {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": this.deadLetterExchange,
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-single-active-consumer": true,
      },
      bindings: MODULE_ROUTING_KEYS.map((key) => [this.eventsExchange, key]),
    };
  }
}
