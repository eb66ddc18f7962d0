/**
 * Encoding and strict decoding of every body, validated at run time against the JSON
 * Schema the Python contracts export (src/generated/schema.ts). A failure is a
 * `DecodeError` naming the offending field as a JSON path (`$.event.module_id`), the
 * form the Python codec gives, so a dead letter's reason reads the same whichever SDK
 * rejected it.
 */
import { createRequire } from "node:module";
import type { ErrorObject, ValidateFunction } from "ajv";
import { DecodeError, MessageTooLarge, ValidationError } from "./errors.js";
import { WIRE_SCHEMA } from "./generated/schema.js";
import type {
  CommandReply,
  CommandRequest,
  EventEnvelope,
  Heartbeat,
} from "./generated/wire.js";

// ajv and ajv-formats are CommonJS; their default export is `module.exports` itself.
const require = createRequire(import.meta.url);
const Ajv2020 = require("ajv/dist/2020.js") as typeof import("ajv/dist/2020.js").default;
const addFormats = require("ajv-formats") as typeof import("ajv-formats").default;

export const JSON_CONTENT_TYPE = "application/json";
export const MSGPACK_CONTENT_TYPE = "application/msgpack";
/** Session messages are small; an over-size body is refused before parsing (as Python). */
export const DEFAULT_MAX_BODY = 1 << 20;

type Json = Record<string, unknown>;

/** msgspec writes a tagged union as `anyOf` + an OpenAPI `discriminator` with a
 * `mapping`; Ajv checks a discriminated union as `oneOf` + `discriminator` without one,
 * and then reports only the errors of the branch the tag selects. */
function forAjv(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(forAjv);
  if (node === null || typeof node !== "object") return node;
  const out: Json = {};
  for (const [key, value] of Object.entries(node as Json)) out[key] = forAjv(value);
  if (out.discriminator && Array.isArray(out.anyOf)) {
    const { propertyName } = out.discriminator as { propertyName: string };
    out.oneOf = out.anyOf;
    delete out.anyOf;
    out.discriminator = { propertyName };
  }
  return out;
}

const ajv = new Ajv2020({ allErrors: false, discriminator: true, strict: false, verbose: true });
addFormats(ajv, ["uuid", "date-time"]);
ajv.addSchema(forAjv(WIRE_SCHEMA) as Json, "wire");

const validators = new Map<string, ValidateFunction>();

function validator(name: string): ValidateFunction {
  let fn = validators.get(name);
  if (fn === undefined) {
    fn = ajv.getSchema(`wire#/$defs/${name}`);
    if (fn === undefined) throw new Error(`no ${name} in the wire schema`);
    validators.set(name, fn);
  }
  return fn;
}

/** Compile the validators of the bodies a module receives now, not on the first
 * delivery (Ajv compiles a schema graph in about a tenth of a second). */
export function prepareValidators(): void {
  validator("EventEnvelope");
  validator("CommandReply");
}

/** `/event/steps/0` → `$.event.steps[0]` (msgspec's path form). */
export function jsonPath(instancePath: string): string {
  let path = "$";
  for (const raw of instancePath.split("/").slice(1)) {
    const part = raw.replaceAll("~1", "/").replaceAll("~0", "~");
    path += /^\d+$/.test(part) ? `[${part}]` : `.${part}`;
  }
  return path;
}

/** A string as Python's `repr` writes it (the Python SDK's reasons quote values so). */
export function pyRepr(value: unknown): string {
  if (value === null || value === undefined) return "None";
  if (typeof value === "string") return `'${value.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
  if (typeof value === "boolean") return value ? "True" : "False";
  return JSON.stringify(value);
}

/** msgspec's name for the JSON type of a value. */
function typeName(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "string") return "str";
  if (typeof value === "boolean") return "bool";
  if (typeof value === "number") return Number.isInteger(value) ? "int" : "float";
  return "object";
}

const SCHEMA_TYPES: Record<string, string> = {
  integer: "int",
  string: "str",
  boolean: "bool",
  number: "float",
  object: "object",
  array: "array",
  null: "null",
};

/** One validation error as msgspec words it: "<what> - at `$.path`", and the field. */
function describe(error: ErrorObject): { message: string; field: string } {
  const at = jsonPath(error.instancePath);
  const params = error.params as Record<string, unknown>;
  const where = at === "$" ? "" : ` - at \`${at}\``;
  switch (error.keyword) {
    case "required": {
      const name = String(params.missingProperty);
      return { message: `Object missing required field \`${name}\`${where}`, field: `${at}.${name}` };
    }
    case "discriminator": {
      const tag = String(params.tag);
      if (params.tagValue === undefined) {
        return { message: `Object missing required field \`${tag}\`${where}`, field: `${at}.${tag}` };
      }
      return { message: `Invalid value ${pyRepr(params.tagValue)} - at \`${at}.${tag}\``, field: `${at}.${tag}` };
    }
    case "type": {
      const expected = String(params.type)
        .split(",")
        .map((t) => SCHEMA_TYPES[t] ?? t)
        .join(" | ");
      return { message: `Expected \`${expected}\`, got \`${typeName(error.data)}\`${where}`, field: at };
    }
    case "pattern":
      return { message: `Expected \`str\` matching regex ${pyRepr(params.pattern)}${where}`, field: at };
    case "maxLength":
      return { message: `Expected \`str\` of length <= ${params.limit}${where}`, field: at };
    case "minimum":
      return { message: `Expected \`${typeName(error.data)}\` >= ${params.limit}${where}`, field: at };
    case "maximum":
      return { message: `Expected \`${typeName(error.data)}\` <= ${params.limit}${where}`, field: at };
    case "enum":
      return { message: `Invalid enum value ${pyRepr(error.data)}${where}`, field: at };
    case "format": {
      const what = params.format === "uuid" ? "UUID" : params.format === "date-time" ? "RFC3339 encoded datetime" : String(params.format);
      return { message: `Invalid ${what}${where}`, field: at };
    }
    default:
      return { message: `${error.message ?? "invalid"}${where}`, field: at };
  }
}

function check<T>(name: string, value: unknown): T {
  const validate = validator(name);
  if (!validate(value)) {
    const first = validate.errors?.[0];
    if (first === undefined) throw new ValidationError(`invalid ${name}`);
    const { message, field } = describe(first);
    throw new ValidationError(message, field);
  }
  return value as T;
}

/** Parse and validate one body as the `$defs` type `name`. */
export function decode<T>(
  name: string,
  body: Buffer | Uint8Array,
  contentType: string | undefined = JSON_CONTENT_TYPE,
  maxBody = DEFAULT_MAX_BODY,
): T {
  if (body.byteLength > maxBody) throw new MessageTooLarge(body.byteLength, maxBody);
  const ct = (contentType || JSON_CONTENT_TYPE).split(";", 1)[0]!.trim().toLowerCase();
  if (ct !== JSON_CONTENT_TYPE) {
    throw new DecodeError(`unsupported content type ${pyRepr(contentType)}`, "content_type");
  }
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString("utf8"));
  } catch (error) {
    throw new DecodeError(`malformed json body: ${(error as Error).message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ValidationError(`Expected \`object\`, got \`${typeName(value)}\``, "$");
  }
  return check<T>(name, value);
}

export function decodeEnvelope(body: Buffer | Uint8Array, contentType?: string): EventEnvelope {
  return decode<EventEnvelope>("EventEnvelope", body, contentType);
}

export function decodeReply(body: Buffer | Uint8Array, contentType?: string): CommandReply {
  const reply = decode<CommandReply>("CommandReply", body, contentType);
  if ((reply.result == null) === (reply.error == null)) {
    throw new ValidationError("a reply carries exactly one of result and error");
  }
  return reply;
}

export function decodeRequest(body: Buffer | Uint8Array, contentType?: string): CommandRequest {
  return decode<CommandRequest>("CommandRequest", body, contentType);
}

export function decodeHeartbeat(body: Buffer | Uint8Array, contentType?: string): Heartbeat {
  return decode<Heartbeat>("Heartbeat", body, contentType);
}

/** Validate a value already parsed (a nested message, a test's fixture). */
export function validate<T>(name: string, value: unknown): T {
  return check<T>(name, value);
}

export function encode(message: unknown): Buffer {
  return Buffer.from(JSON.stringify(message), "utf8");
}
