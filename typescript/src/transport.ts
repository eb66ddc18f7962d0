/**
 * The bus on RabbitMQ, through amqplib, with the reconnect it leaves to its user.
 *
 * One connection. Publishes go through one confirm channel and resolve on the
 * broker's confirm; each consumer gets its own channel, so its prefetch and its
 * failures are its own; requests use RabbitMQ's direct reply-to on a channel of their
 * own (the request must leave on the channel that consumes the pseudo-queue). When the
 * connection drops, every waiting request fails at once with a retryable
 * `TransportError`, a loop reconnects with capped exponential back-off, and every
 * consumer is re-established on a new channel (its queue declared again first).
 * Deliveries of the lost channel can no longer be settled: the broker redelivers them,
 * and the consumer's dedupe by version absorbs that.
 */
import { connect, type Channel, type ChannelModel, type ConfirmChannel, type ConsumeMessage } from "amqplib";
import { TransportError } from "./errors.js";
import { DIRECT_REPLY_TO, type QueueSpec } from "./topology.js";

export interface OutgoingMessage {
  body: Buffer;
  contentType: string;
  headers?: Record<string, unknown>;
  messageId?: string;
  correlationId?: string;
  type?: string;
  /** The broker refuses a message whose user_id is not the connection's user. */
  userId?: string;
  persistent?: boolean;
  expirationMs?: number;
}

export interface Delivery {
  readonly body: Buffer;
  readonly contentType: string | undefined;
  readonly headers: Record<string, unknown>;
  readonly exchange: string;
  readonly routingKey: string;
  readonly messageId: string | undefined;
  readonly correlationId: string | undefined;
  readonly type: string | undefined;
  readonly redelivered: boolean;
  readonly settled: boolean;
  ack(): Promise<void>;
  /** Back to the queue (the quorum queue's delivery limit dead-letters a message that
   * keeps coming back). */
  requeue(): Promise<void>;
  /** This message as one to publish again (dead-lettering), with changes. */
  toOutgoing(changes?: Partial<OutgoingMessage>): OutgoingMessage;
}

export type Handler = (delivery: Delivery) => Promise<void>;

export interface ConsumerHandle {
  /** Stop receiving new deliveries; unsettled ones stay with the caller. Idempotent. */
  cancel(): Promise<void>;
  /** Cancel and close the channel: deliveries still unsettled go back to the queue. */
  close(): Promise<void>;
}

export interface TransportOptions {
  connectionName?: string;
  /** AMQP heartbeat in seconds (both sides see a dead peer within about twice this). */
  heartbeat?: number;
  /** Back-off between reconnect attempts, milliseconds. */
  reconnectDelayMs?: { initial: number; max: number };
  /** How long an operation waits for a lost connection to come back. */
  waitForConnectionMs?: number;
  /** How long a publish waits for its confirm. */
  confirmTimeoutMs?: number;
}

interface Consumer {
  queue: string;
  spec: QueueSpec | undefined;
  handler: Handler;
  prefetch: number;
  channel: Channel | null;
  acks: Acks | null;
  tag: string | null;
  stopped: boolean;
}

interface Waiting {
  resolve: (delivery: { body: Buffer; contentType: string | undefined }) => void;
  reject: (error: Error) => void;
}

function lost(what: string, error: unknown): TransportError {
  const reason = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return new TransportError(`${what}: connection lost (${reason})`, true, { cause: error });
}

function userOf(url: string): string {
  try {
    return decodeURIComponent(new URL(url).username) || "guest";
  } catch {
    return "guest";
  }
}

function redact(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "<invalid url>";
  }
}

export class AmqpTransport {
  readonly url: string;
  /** The broker's addresses (a cluster's nodes: `url` may list several, comma-separated). */
  readonly addresses: string[];
  private address = 0;
  /** The connection's user: stamped as user_id on what this transport publishes. */
  readonly user: string;
  readonly options: Required<TransportOptions>;
  private model: ChannelModel | null = null;
  private publisher: ConfirmChannel | null = null;
  private replies: Channel | null = null;
  private readonly consumers = new Set<Consumer>();
  private readonly waiting = new Map<string, Waiting>();
  private connected: Promise<void> | null = null;
  private connectedResolve: (() => void) | null = null;
  private closing = false;
  private reconnecting = false;
  private requestCounter = 0;
  /** Times the connection was re-established after a loss. */
  reconnects = 0;
  private readonly listeners = new Set<() => void>();

  constructor(url: string, options: TransportOptions = {}) {
    this.url = url;
    this.addresses = url
      .split(",")
      .map((a) => a.trim())
      .filter((a) => a !== "");
    if (this.addresses.length === 0) throw new TransportError("no broker address given", false);
    this.user = userOf(this.addresses[0]!);
    this.options = {
      connectionName: options.connectionName ?? "sessionbus-module-ts",
      heartbeat: options.heartbeat ?? 10,
      reconnectDelayMs: options.reconnectDelayMs ?? { initial: 100, max: 5000 },
      waitForConnectionMs: options.waitForConnectionMs ?? 30_000,
      confirmTimeoutMs: options.confirmTimeoutMs ?? 30_000,
    };
  }

  /** The first connection; fails at once (not retried) when the broker is unreachable. */
  async connect(): Promise<void> {
    this.closing = false;
    try {
      await this.open();
    } catch (error) {
      throw new TransportError(
        `cannot connect to ${this.addresses.map(redact).join(", ")}: ${(error as Error).message}`,
        false,
        { cause: error },
      );
    }
  }

  /** Called after every reconnect (consumers are already re-established). */
  onReconnect(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get isConnected(): boolean {
    return this.model !== null && !this.reconnecting;
  }

  /** Connect to the first address that answers, starting at the current one. */
  private async dial(): Promise<ChannelModel> {
    let last: unknown;
    for (let i = 0; i < this.addresses.length; i += 1) {
      const index = (this.address + i) % this.addresses.length;
      const url = new URL(this.addresses[index]!);
      if (!url.searchParams.has("heartbeat")) {
        url.searchParams.set("heartbeat", String(this.options.heartbeat));
      }
      try {
        const model = await connect(url.toString(), {
          clientProperties: { connection_name: this.options.connectionName },
        });
        this.address = index;
        return model;
      } catch (error) {
        last = error;
      }
    }
    throw last;
  }

  private async open(): Promise<void> {
    const model = await this.dial();
    model.on("error", () => {
      // Followed by "close", where the loss is handled; without a listener an
      // "error" event would throw.
    });
    model.on("close", (error?: Error) => this.onClosed(model, error));
    this.model = model;
    try {
      await this.openPublisher(model);
      await this.openReplies(model);
      for (const consumer of this.consumers) {
        if (!consumer.stopped) await this.startConsumer(consumer);
      }
    } catch (error) {
      this.model = null;
      await model.close().catch(() => {});
      throw error;
    }
    this.connectedResolve?.();
    this.connected = null;
    this.connectedResolve = null;
  }

  /** The confirm channel. A channel the broker closes alone (a publish it refused,
   * such as one with another user's user_id) is opened again; the connection is fine. */
  private async openPublisher(model: ChannelModel): Promise<void> {
    const publisher = await model.createConfirmChannel();
    publisher.on("error", () => {});
    publisher.on("close", () => {
      if (this.publisher !== publisher) return;
      this.publisher = null;
      if (this.model === model && !this.closing) {
        this.openPublisher(model).catch(() => {});
      }
    });
    this.publisher = publisher;
  }

  /** The request channel, consuming the direct reply-to pseudo-queue; opened again
   * when the broker closes it alone (waiting requests fail, retryable). */
  private async openReplies(model: ChannelModel): Promise<void> {
    const replies = await model.createChannel();
    replies.on("error", () => {});
    replies.on("close", () => {
      if (this.replies !== replies) return;
      this.replies = null;
      this.failWaiting(new TransportError("reply channel closed", true));
      if (this.model === model && !this.closing) {
        this.openReplies(model).catch(() => {});
      }
    });
    await replies.consume(DIRECT_REPLY_TO, (message) => this.onReply(message), { noAck: true });
    this.replies = replies;
  }

  private onClosed(model: ChannelModel, error: Error | undefined): void {
    if (this.model !== model) return;
    this.model = null;
    this.publisher = null;
    this.replies = null;
    for (const consumer of this.consumers) {
      consumer.channel = null;
      consumer.tag = null;
    }
    this.failWaiting(lost("request", error ?? new Error("connection closed")));
    // Its node may be gone: the next address is tried first.
    this.address = (this.address + 1) % this.addresses.length;
    if (!this.closing) void this.reconnect();
  }

  private failWaiting(error: Error): void {
    const waiting = [...this.waiting.values()];
    this.waiting.clear();
    for (const w of waiting) w.reject(error);
  }

  private async reconnect(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    this.connected ??= new Promise<void>((resolve) => {
      this.connectedResolve = resolve;
    });
    let delay = this.options.reconnectDelayMs.initial;
    while (!this.closing) {
      await new Promise((resolve) => setTimeout(resolve, delay));
      if (this.closing) break;
      try {
        await this.open();
        this.reconnecting = false;
        this.reconnects += 1;
        for (const listener of this.listeners) listener();
        return;
      } catch {
        delay = Math.min(delay * 2, this.options.reconnectDelayMs.max);
      }
    }
    this.reconnecting = false;
  }

  /** Resolves when connected; a `TransportError` after `waitForConnectionMs`. */
  private async ready(what: string): Promise<ChannelModel> {
    if (this.closing) throw new TransportError(`${what}: the transport is closed`, false);
    if (this.model !== null && !this.reconnecting) return this.model;
    const wait = this.connected ?? Promise.resolve();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new TransportError(`${what}: not connected to the broker`, true)),
        this.options.waitForConnectionMs,
      );
    });
    try {
      await Promise.race([wait, timeout]);
    } finally {
      clearTimeout(timer);
    }
    if (this.model === null) throw new TransportError(`${what}: not connected to the broker`, true);
    return this.model;
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.failWaiting(new TransportError("transport closed", false));
    const model = this.model;
    this.model = null;
    await model?.close().catch(() => {});
    this.connectedResolve?.();
  }

  /** Declare a queue and its bindings on a channel of its own (a refused declaration
   * closes only that channel). */
  async declareQueue(spec: QueueSpec): Promise<void> {
    await this.declareOn(await this.ready(`declare ${spec.name}`), spec);
  }

  private async declareOn(model: ChannelModel, spec: QueueSpec): Promise<void> {
    let channel: Channel;
    try {
      channel = await model.createChannel();
    } catch (error) {
      throw lost(`declare ${spec.name}`, error);
    }
    channel.on("error", () => {});
    try {
      await channel.assertQueue(spec.name, { durable: true, arguments: spec.arguments });
      for (const [exchange, key] of spec.bindings) {
        await channel.bindQueue(spec.name, exchange, key);
      }
    } catch (error) {
      throw new TransportError(`declare ${spec.name}: ${(error as Error).message}`, false, {
        cause: error,
      });
    } finally {
      await channel.close().catch(() => {});
    }
  }

  /** Publish and wait for the broker's confirm. */
  async publish(exchange: string, routingKey: string, message: OutgoingMessage): Promise<void> {
    await this.ready(`publish to ${exchange}`);
    const channel = this.publisher;
    if (channel === null) throw new TransportError(`publish to ${exchange}: no channel`, true);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new TransportError(`publish to ${exchange}: no confirm in time`, true)),
        this.options.confirmTimeoutMs,
      );
      try {
        channel.publish(exchange, routingKey, message.body, properties(message), (error) => {
          clearTimeout(timer);
          if (error) reject(new TransportError(`publish to ${exchange}: nacked by the broker`, true));
          else resolve();
        });
      } catch (error) {
        clearTimeout(timer);
        reject(lost(`publish to ${exchange}`, error));
      }
    });
  }

  /** Send a request to `queue` and wait for its reply (direct reply-to). */
  async request(
    queue: string,
    message: OutgoingMessage,
    timeoutMs: number,
  ): Promise<{ body: Buffer; contentType: string | undefined }> {
    await this.ready(`request to ${queue}`);
    const channel = this.replies;
    if (channel === null) throw new TransportError(`request to ${queue}: no channel`, true);
    this.requestCounter += 1;
    const correlationId = `r${this.requestCounter}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(correlationId);
        reject(new TimeoutError(`no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(correlationId, {
        resolve: (reply) => {
          clearTimeout(timer);
          resolve(reply);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      try {
        channel.publish("", queue, message.body, {
          ...properties(message),
          correlationId,
          replyTo: DIRECT_REPLY_TO,
        });
      } catch (error) {
        this.waiting.delete(correlationId);
        clearTimeout(timer);
        reject(lost(`request to ${queue}`, error));
      }
    });
  }

  private onReply(message: ConsumeMessage | null): void {
    if (message === null) return;
    const id = message.properties.correlationId as string | undefined;
    const waiting = id === undefined ? undefined : this.waiting.get(id);
    if (id === undefined || waiting === undefined) return; // late: its caller gave up
    this.waiting.delete(id);
    waiting.resolve({
      body: message.content,
      contentType: message.properties.contentType as string | undefined,
    });
  }

  /** Consume `queue` with `prefetch` unacknowledged deliveries at most. After a
   * reconnect the queue is declared again (`spec`) and the consumer restarted. */
  async consume(
    queue: string,
    handler: Handler,
    options: { prefetch: number; spec?: QueueSpec },
  ): Promise<ConsumerHandle> {
    await this.ready(`consume ${queue}`);
    const consumer: Consumer = {
      queue,
      spec: options.spec,
      handler,
      prefetch: options.prefetch,
      channel: null,
      acks: null,
      tag: null,
      stopped: false,
    };
    this.consumers.add(consumer);
    try {
      await this.startConsumer(consumer);
    } catch (error) {
      this.consumers.delete(consumer);
      throw error;
    }
    const cancel = async (): Promise<void> => {
      consumer.stopped = true;
      const { channel, tag } = consumer;
      consumer.tag = null;
      if (channel !== null && tag !== null) await channel.cancel(tag).catch(() => {});
    };
    return {
      cancel,
      close: async () => {
        await cancel();
        this.consumers.delete(consumer);
        const channel = consumer.channel;
        consumer.channel = null;
        consumer.acks?.flush(); // what was handled is acked before the channel goes
        await channel?.close().catch(() => {});
      },
    };
  }

  private async startConsumer(consumer: Consumer): Promise<void> {
    const model = this.model;
    if (model === null) throw new TransportError(`consume ${consumer.queue}: not connected`, true);
    // On the model given, not through `ready()`: during a reconnect this runs before
    // the transport counts as connected again.
    if (consumer.spec !== undefined) await this.declareOn(model, consumer.spec);
    const channel = await model.createChannel();
    channel.on("error", () => {});
    channel.on("close", () => {
      if (consumer.channel !== channel) return;
      consumer.channel = null;
      consumer.tag = null;
      // The channel went alone (the connection is fine): restart the consumer after a
      // pause, unless it was stopped.
      if (!consumer.stopped && this.model === model && !this.closing) {
        setTimeout(() => {
          if (!consumer.stopped && this.model === model && consumer.channel === null) {
            this.startConsumer(consumer).catch(() => {});
          }
        }, this.options.reconnectDelayMs.max / 5).unref();
      }
    });
    await channel.prefetch(consumer.prefetch, false);
    consumer.channel = channel;
    const acks = new Acks(channel);
    consumer.acks = acks;
    const reply = await channel.consume(
      consumer.queue,
      (message) => {
        if (message === null) return; // cancelled by the broker; the channel's close restarts it
        acks.opened(message);
        void consumer.handler(new AmqpDelivery(channel, message, acks));
      },
      { noAck: false },
    );
    consumer.tag = reply.consumerTag;
  }
}

export class TimeoutError extends Error {
  override name = "TimeoutError";
}

function properties(message: OutgoingMessage): Record<string, unknown> {
  const props: Record<string, unknown> = {
    contentType: message.contentType,
    headers: message.headers ?? {},
    persistent: message.persistent ?? true,
  };
  if (message.messageId !== undefined) props.messageId = message.messageId;
  if (message.correlationId !== undefined) props.correlationId = message.correlationId;
  if (message.type !== undefined) props.type = message.type;
  if (message.userId !== undefined) props.userId = message.userId;
  if (message.expirationMs !== undefined) props.expiration = String(message.expirationMs);
  return props;
}

/**
 * The acks of one consumer channel, sent together once per turn of the event loop (as
 * the Python transport does): an ack only marks its delivery done; the flush sends one
 * `multiple` ack for the oldest unbroken run of done deliveries, and single acks for
 * done ones behind a delivery still being handled (never covering it). A requeue is
 * sent at once and forgotten here, so no later `multiple` ack can cover it.
 */
class Acks {
  private readonly open = new Map<number, { message: ConsumeMessage; done: boolean }>();
  private scheduled = false;

  constructor(private readonly channel: Channel) {}

  opened(message: ConsumeMessage): void {
    this.open.set(message.fields.deliveryTag, { message, done: false });
  }

  done(message: ConsumeMessage): void {
    const entry = this.open.get(message.fields.deliveryTag);
    if (entry === undefined) return;
    entry.done = true;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  forget(message: ConsumeMessage): void {
    this.open.delete(message.fields.deliveryTag);
  }

  /** Send what is done now (also before the channel closes on a graceful stop). */
  flush(): void {
    this.scheduled = false;
    let run: ConsumeMessage | null = null;
    const behind: ConsumeMessage[] = [];
    let broken = false;
    for (const [tag, entry] of this.open) {
      if (!entry.done) {
        broken = true;
        continue;
      }
      if (broken) behind.push(entry.message);
      else run = entry.message;
      this.open.delete(tag);
    }
    try {
      if (run !== null) this.channel.ack(run, true);
      for (const message of behind) this.channel.ack(message);
    } catch {
      // The channel is gone: the broker redelivers what these named.
    }
  }
}

class AmqpDelivery implements Delivery {
  settled = false;
  readonly headers: Record<string, unknown>;

  constructor(
    private readonly channel: Channel,
    private readonly message: ConsumeMessage,
    private readonly acks: Acks,
  ) {
    this.headers = { ...(message.properties.headers ?? {}) };
  }

  get body(): Buffer {
    return this.message.content;
  }
  get contentType(): string | undefined {
    return this.message.properties.contentType as string | undefined;
  }
  get exchange(): string {
    return this.message.fields.exchange;
  }
  get routingKey(): string {
    return this.message.fields.routingKey;
  }
  get messageId(): string | undefined {
    return this.message.properties.messageId as string | undefined;
  }
  get correlationId(): string | undefined {
    return this.message.properties.correlationId as string | undefined;
  }
  get type(): string | undefined {
    return this.message.properties.type as string | undefined;
  }
  get redelivered(): boolean {
    return this.message.fields.redelivered;
  }

  async ack(): Promise<void> {
    if (this.settled) return;
    this.acks.done(this.message);
    this.settled = true;
  }

  async requeue(): Promise<void> {
    if (this.settled) return;
    try {
      this.channel.nack(this.message, false, true);
    } catch (error) {
      throw lost("requeue", error);
    }
    this.acks.forget(this.message);
    this.settled = true;
  }

  toOutgoing(changes: Partial<OutgoingMessage> = {}): OutgoingMessage {
    const out: OutgoingMessage = {
      body: this.body,
      contentType: this.contentType ?? "application/octet-stream",
      headers: { ...this.headers },
    };
    if (this.messageId !== undefined) out.messageId = this.messageId;
    if (this.correlationId !== undefined) out.correlationId = this.correlationId;
    if (this.type !== undefined) out.type = this.type;
    return { ...out, ...changes };
  }
}
