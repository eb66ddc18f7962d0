/**
 * The consumer runtime: a module's queue, applied once per session version, in order.
 *
 * amqplib hands over deliveries as they arrive and this runs each at once, so ordering
 * is ours to keep (as in the Python SDK): deliveries of one session wait on that
 * session's FIFO lock, a version at or below what was applied is a duplicate and is
 * acked unseen, and a version past a gap — or an event the coordinator had already
 * folded before this process caught up — is brought up to date from the coordinator's
 * history first, folded as a whole, and reacted to once. Sessions run concurrently up
 * to `concurrency`.
 *
 * Ack policy, the Python SDK's: ack after the event is applied; a failure to apply
 * requeues (the quorum queue's delivery limit dead-letters a message that keeps
 * failing); an undecodable or invalid body goes to the dead-letter queue at once with
 * its reason in headers, as does an event that can never be applied (the coordinator
 * does not know its session, or its history lacks the versions before it).
 */
import { decodeEnvelope } from "./codec.js";
import { CommandFailed, DecodeError, MessageTooLarge, SdkError, TransportError } from "./errors.js";
import type { ErrorCode, EventEnvelope } from "./generated/wire.js";
import { HEADERS, REGISTRY_ID, type Topology } from "./topology.js";
import type { AmqpTransport, ConsumerHandle, Delivery } from "./transport.js";

/** What the consumer needs of the manager. */
export interface Projection {
  /** The version of a session this process has applied (0: none). */
  currentVersion(sessionId: string): number;
  /** Whether `env` was already in the coordinator's state when this process caught up:
   * then its session is brought up to date from the history, not event by event. */
  isHistory(env: EventEnvelope): boolean;
  /** Fold one event and react to it. Throws to have the delivery requeued. */
  apply(env: EventEnvelope): Promise<void>;
  /** Fold `events` (consecutive versions after the current one) and react once to
   * the state they add up to. `history`: the session's state as the coordinator
   * already held it when this process caught up (learnt, not applied one by one). */
  applyBatch(sessionId: string, events: EventEnvelope[], history: boolean): Promise<void>;
  /** The session's stored history (the coordinator's), for gap fill. */
  history(sessionId: string): Promise<EventEnvelope[]>;
}

export interface ConsumerStats {
  received: number;
  applied: number;
  duplicates: number;
  gapsFilled: number;
  /** Events of sessions brought up to date from the coordinator's history. */
  caughtUp: number;
  deadLettered: number;
  requeued: number;
}

/** Registry events are not a per-module sequence: remember this many event ids. */
const SEEN_REGISTRY = 10_000;

class Unfillable extends SdkError {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** Publish a message that cannot be processed to the dead-letter exchange with its
 * reason in headers (confirmed), then ack it: a crash in between leaves a duplicate in
 * the dead-letter queue, never a loss. The Python `contracts.topology.dead_letter`. */
export async function deadLetter(
  transport: AmqpTransport,
  topology: Topology,
  delivery: Delivery,
  reason: { reason: string; code: ErrorCode; rejectedBy: string; field?: string | null },
): Promise<void> {
  const headers: Record<string, unknown> = { ...delivery.headers };
  headers[HEADERS.REJECT_REASON] = reason.reason.slice(0, 1000);
  headers[HEADERS.REJECT_CODE] = reason.code;
  headers[HEADERS.REJECTED_BY] = reason.rejectedBy;
  headers["x-original-routing-key"] = delivery.routingKey;
  headers["x-original-exchange"] = delivery.exchange;
  if (reason.field != null) headers[HEADERS.REJECT_FIELD] = reason.field;
  const message = delivery.toOutgoing({ headers });
  delete message.userId; // published by this connection's user, not the original sender
  await transport.publish(topology.deadLetterExchange, delivery.routingKey, message);
  await delivery.ack();
}

/** A counting semaphore (bounded concurrency across sessions). */
class Slots {
  private waiters: Array<() => void> = [];
  constructor(private free: number) {}
  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free -= 1;
      return;
    }
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }
  release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.free += 1;
  }
}

export class EventConsumer {
  readonly queue: string;
  readonly stats: ConsumerStats = {
    received: 0,
    applied: 0,
    duplicates: 0,
    gapsFilled: 0,
    caughtUp: 0,
    deadLettered: 0,
    requeued: 0,
  };
  /** Applied versions per session, in apply order, when `recordVersions` is set. */
  readonly versions = new Map<string, number[]>();
  recordVersions = false;
  private readonly slots: Slots;
  /** Per session, the tail of its chain of deliveries (FIFO: arrival order). */
  private readonly tails = new Map<string, Promise<void>>();
  private readonly seenRegistry = new Set<string>();
  private handle: ConsumerHandle | null = null;
  private readonly inflight = new Set<Promise<void>>();
  private stopping = false;

  constructor(
    readonly transport: AmqpTransport,
    readonly topology: Topology,
    readonly moduleId: string,
    private readonly projection: Projection,
    readonly options: { prefetch: number; concurrency: number },
  ) {
    this.queue = topology.moduleQueue(moduleId);
    this.slots = new Slots(options.concurrency);
  }

  async start(): Promise<void> {
    this.stopping = false;
    this.handle = await this.transport.consume(this.queue, (d) => this.onDelivery(d), {
      prefetch: this.options.prefetch,
      spec: this.topology.moduleQueueSpec(this.moduleId),
    });
  }

  /** Stop consuming, wait (bounded) for events being applied; what was prefetched and
   * not started goes back to the queue when the channel closes. */
  async stop(graceMs = 10_000): Promise<void> {
    this.stopping = true;
    const handle = this.handle;
    this.handle = null;
    await handle?.cancel();
    if (this.inflight.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        Promise.allSettled([...this.inflight]),
        new Promise((resolve) => {
          timer = setTimeout(resolve, graceMs);
        }),
      ]);
      clearTimeout(timer);
    }
    await handle?.close();
  }

  private onDelivery(delivery: Delivery): Promise<void> {
    const handling = this.handleDelivery(delivery).catch(async (error: unknown) => {
      if (error instanceof TransportError) return; // not settled: the broker redelivers it
      // Nothing else should reach here; requeue rather than lose the message.
      await delivery.requeue().catch(() => {});
    });
    this.inflight.add(handling);
    void handling.finally(() => this.inflight.delete(handling));
    return handling;
  }

  private async handleDelivery(delivery: Delivery): Promise<void> {
    this.stats.received += 1;
    let env: EventEnvelope;
    try {
      env = decodeEnvelope(delivery.body, delivery.contentType);
    } catch (error) {
      if (!(error instanceof DecodeError)) throw error;
      this.stats.deadLettered += 1;
      await deadLetter(this.transport, this.topology, delivery, {
        reason: error.message,
        code: error instanceof MessageTooLarge ? "MESSAGE_TOO_LARGE" : "INVALID_MESSAGE",
        field: error.field,
        rejectedBy: this.moduleId,
      });
      return;
    }
    if (env.session_id === REGISTRY_ID) {
      await this.registryEvent(env, delivery);
      return;
    }
    const sid = env.session_id;
    const previous = this.tails.get(sid) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => {
      release = resolve;
    });
    this.tails.set(sid, mine);
    await previous;
    try {
      await this.slots.acquire();
      try {
        await this.inOrder(env, delivery);
      } finally {
        this.slots.release();
      }
    } finally {
      release();
      if (this.tails.get(sid) === mine) this.tails.delete(sid);
    }
  }

  private async inOrder(env: EventEnvelope, delivery: Delivery): Promise<void> {
    const sid = env.session_id;
    const current = this.projection.currentVersion(sid);
    if (env.version <= current) {
      this.stats.duplicates += 1;
      await delivery.ack();
      return;
    }
    if (this.stopping && !delivery.settled) {
      await delivery.requeue();
      return;
    }
    try {
      if (current === 0 && this.projection.isHistory(env)) {
        const events = await this.missing(sid, current, env);
        await this.projection.applyBatch(sid, events, true);
        this.stats.caughtUp += events.length;
      } else if (env.version > current + 1) {
        const events = await this.missing(sid, current, env);
        await this.projection.applyBatch(sid, events, false);
        this.stats.gapsFilled += events.length - 1;
        this.record(events);
      } else {
        await this.projection.apply(env);
        this.record([env]);
      }
    } catch (error) {
      if (error instanceof Unfillable || error instanceof DecodeError) {
        // The coordinator, whose store is the source of truth, has no such session or
        // not the versions before this one; or the event cannot follow the session's
        // state: no redelivery can ever apply it.
        this.stats.deadLettered += 1;
        await deadLetter(this.transport, this.topology, delivery, {
          reason: `event v${env.version} of session ${sid} cannot be applied: ${error.message}`,
          code: error instanceof Unfillable ? error.code : "INVALID_MESSAGE",
          field: error instanceof DecodeError ? error.field : "session_id",
          rejectedBy: this.moduleId,
        });
        return;
      }
      this.stats.requeued += 1;
      await delivery.requeue();
      return;
    }
    await delivery.ack();
  }

  private record(events: EventEnvelope[]): void {
    this.stats.applied += events.length;
    if (!this.recordVersions) return;
    for (const env of events) {
      const list = this.versions.get(env.session_id) ?? [];
      list.push(env.version);
      this.versions.set(env.session_id, list);
    }
  }

  /** Versions `applied+1 ..` the end of the coordinator's history (at least up to the
   * arriving one), in order; `Unfillable` when the history does not have them all. */
  private async missing(sid: string, applied: number, arriving: EventEnvelope): Promise<EventEnvelope[]> {
    let history: EventEnvelope[];
    try {
      history = await this.projection.history(sid);
    } catch (error) {
      if (error instanceof CommandFailed && error.code === "UNKNOWN_SESSION") {
        throw new Unfillable(
          "UNKNOWN_SESSION",
          `the coordinator does not know the session: ${error.error.message}`,
        );
      }
      throw error;
    }
    const byVersion = new Map<number, EventEnvelope>();
    for (const env of history) if (env.version > applied) byVersion.set(env.version, env);
    if (!byVersion.has(arriving.version)) byVersion.set(arriving.version, arriving);
    const versions = [...byVersion.keys()].sort((a, b) => a - b);
    const last = versions.at(-1) ?? applied;
    if (versions.length !== last - applied || versions[0] !== applied + 1) {
      throw new Unfillable(
        "INVALID_MESSAGE",
        `the coordinator's history has no versions ${applied + 1}..${arriving.version - 1}`,
      );
    }
    return versions.map((v) => byVersion.get(v)!);
  }

  private async registryEvent(env: EventEnvelope, delivery: Delivery): Promise<void> {
    if (this.seenRegistry.has(env.event_id)) {
      this.stats.duplicates += 1;
      await delivery.ack();
      return;
    }
    try {
      await this.projection.apply(env);
    } catch {
      this.stats.requeued += 1;
      await delivery.requeue();
      return;
    }
    this.seenRegistry.add(env.event_id);
    if (this.seenRegistry.size > SEEN_REGISTRY) {
      const oldest = this.seenRegistry.values().next().value;
      if (oldest !== undefined) this.seenRegistry.delete(oldest);
    }
    this.stats.applied += 1;
    await delivery.ack();
  }
}
