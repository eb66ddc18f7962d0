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

/** Most command partitions (each a quorum queue with one active consumer). */
export const MAX_PARTITIONS = 256;

/** All broker names for one prefix. `partitions` splits the commands queue in N
 * queues, `<prefix>.commands.<i>`; a command goes to the partition of its workflow
 * session (UUID as an integer, modulo N; commands without one to partition 0), as the
 * Python client computes it. Clients and coordinators must agree on N. */
export class Topology {
  readonly prefix: string;
  readonly partitions: number;

  constructor(prefix: string = DEFAULT_PREFIX, partitions = 1) {
    if (!PREFIX_PATTERN.test(prefix)) {
      throw new RangeError(`topology prefix must match ${PREFIX_PATTERN.source}, got ${prefix}`);
    }
    if (!Number.isInteger(partitions) || partitions < 1 || partitions > MAX_PARTITIONS) {
      throw new RangeError(`partitions must be 1..${MAX_PARTITIONS}, got ${partitions}`);
    }
    this.prefix = prefix;
    this.partitions = partitions;
  }

  /** The prefix given, else SESSIONBUS_PREFIX, else the default; the partitions
   * given, else SESSIONBUS_PARTITIONS, else 1. */
  static fromEnv(prefix?: string, partitions?: number): Topology {
    const raw = process.env.SESSIONBUS_PARTITIONS ?? "1";
    const n = partitions ?? Number(raw);
    if (!Number.isInteger(n)) throw new RangeError(`SESSIONBUS_PARTITIONS must be a whole number, got ${raw}`);
    return new Topology(prefix || process.env.SESSIONBUS_PREFIX || DEFAULT_PREFIX, n);
  }

  /** The partition of a workflow session's commands (0 without a session). */
  partitionOf(sessionId: string | null | undefined): number {
    if (sessionId == null || this.partitions === 1) return 0;
    return Number(BigInt(`0x${sessionId.replaceAll("-", "")}`) % BigInt(this.partitions));
  }

  /** Where a command about `sessionId` goes. */
  commandQueueFor(sessionId: string | null | undefined): string {
    if (this.partitions === 1) return this.commandsQueue;
    return `${this.commandsQueue}.${this.partitionOf(sessionId)}`;
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
  /** The dead-letter inbox the broker dead-letters into (read through the stream). */
  get deadLetterQueue(): string {
    return `${this.prefix}.dlq`;
  }
  /** Where dead letters are kept and read (`sessionctl dlq`). */
  get deadLetterStream(): string {
    return `${this.prefix}.dead-letters`;
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
