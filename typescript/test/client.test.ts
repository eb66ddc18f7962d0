/**
 * The coordinator client's timeouts and retries, against a stand-in coordinator on
 * the commands queue that answers as told: a retried command keeps its command id and
 * carries the connection's user as user_id; no reply is tried again; a retryable
 * refusal every time ends in StoreUnavailable (STORE_UNAVAILABLE) or
 * CoordinatorUnavailable; a refusal is a CommandFailed at once.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { type Channel, type ChannelModel, connect } from "amqplib";
import {
  AmqpTransport,
  CommandFailed,
  CoordinatorClient,
  CoordinatorUnavailable,
  StoreUnavailable,
  Topology,
} from "../src/index.js";
import { AMQP_URL, deletePrefix, requireBroker, uniquePrefix } from "./support/env.js";

type Answer = "none" | "store-unavailable" | "forbidden" | "ok";

const prefix = uniquePrefix("client");
const topology = new Topology(prefix);
let raw: ChannelModel;
let channel: Channel;
let transport: AmqpTransport;
let script: Answer[] = [];
const seen: Array<{ commandId: string; userId: string | undefined }> = [];

before(async () => {
  await requireBroker();
  raw = await connect(AMQP_URL);
  channel = await raw.createChannel();
  // Exclusive: RabbitMQ 4 refuses transient non-exclusive queues (a deprecated feature).
  await channel.assertQueue(topology.commandsQueue, { durable: false, exclusive: true });
  await channel.consume(
    topology.commandsQueue,
    (message) => {
      if (message === null) return;
      const request = JSON.parse(message.content.toString()) as { command_id: string };
      seen.push({ commandId: request.command_id, userId: message.properties.userId as string | undefined });
      const answer = script.shift() ?? "ok";
      const reply =
        answer === "ok"
          ? { command_id: request.command_id, result: { type: "accepted", version: 1, events: 1 } }
          : answer === "store-unavailable"
            ? {
                command_id: request.command_id,
                error: { code: "STORE_UNAVAILABLE", message: "store away", retryable: true },
              }
            : { command_id: request.command_id, error: { code: "FORBIDDEN", message: "not yours" } };
      if (answer !== "none") {
        channel.publish("", message.properties.replyTo as string, Buffer.from(JSON.stringify(reply)), {
          correlationId: message.properties.correlationId as string,
          contentType: "application/json",
        });
      }
    },
    { noAck: true },
  );
  transport = new AmqpTransport(AMQP_URL, { connectionName: "tss client" });
  await transport.connect();
});

after(async () => {
  await transport?.close();
  await raw?.close().catch(() => {});
  await deletePrefix(prefix);
});

const command = { type: "record-activity", session_id: "00000000-0000-4000-8000-000000000001" } as const;

test("no reply is tried again with the same command id; a reply then is the answer", async () => {
  seen.length = 0;
  script = ["none", "ok"];
  const client = new CoordinatorClient(transport, topology, { timeoutMs: 300, attempts: 3 });
  const result = await client.call(command);
  assert.equal(result.type, "accepted");
  assert.equal(seen.length, 2);
  assert.equal(seen[0]!.commandId, seen[1]!.commandId);
  assert.deepEqual(
    seen.map((s) => s.userId),
    ["guest", "guest"],
  );
});

test("a store that stays away ends in StoreUnavailable after every attempt", async () => {
  seen.length = 0;
  script = ["store-unavailable", "store-unavailable", "store-unavailable"];
  const client = new CoordinatorClient(transport, topology, { timeoutMs: 1000, attempts: 3 });
  await assert.rejects(client.call(command), (error: unknown) => {
    assert.ok(error instanceof StoreUnavailable, String(error));
    assert.ok(error instanceof CoordinatorUnavailable);
    assert.equal(error.error.code, "STORE_UNAVAILABLE");
    return true;
  });
  assert.equal(seen.length, 3);
  assert.equal(new Set(seen.map((s) => s.commandId)).size, 1);
});

test("silence ends in CoordinatorUnavailable; a refusal is a CommandFailed at once", async () => {
  seen.length = 0;
  script = ["none", "none"];
  const client = new CoordinatorClient(transport, topology, { timeoutMs: 200, attempts: 2 });
  await assert.rejects(client.call(command), (error: unknown) => {
    return error instanceof CoordinatorUnavailable && !(error instanceof StoreUnavailable);
  });
  assert.equal(seen.length, 2);
  seen.length = 0;
  script = ["forbidden"];
  await assert.rejects(client.call(command), (error: unknown) => {
    return error instanceof CommandFailed && error.code === "FORBIDDEN";
  });
  assert.equal(seen.length, 1);
});
