/**
 * The SDK's exception tree (one root, as in the Python SDK's `module_sdk.errors` and
 * `contracts.errors`).
 *
 *   SdkError
 *   ├── DecodeError            bytes that are not a valid message (field names the JSON path)
 *   │   ├── ValidationError    well-formed but breaking the schema
 *   │   └── MessageTooLarge
 *   ├── TransportError         the broker connection or channel (retryable: may succeed later)
 *   ├── CommandFailed          the coordinator refused a command (typed StandardError)
 *   └── CoordinatorUnavailable no reply within the timeout, after every retry
 *       └── StoreUnavailable   answered, every attempt, that its event store is away
 */
import type { ErrorCode, StandardError as WireStandardError } from "./generated/wire.js";

export class SdkError extends Error {
  override name = "SdkError";
}

export class DecodeError extends SdkError {
  override name = "DecodeError";
  constructor(
    message: string,
    readonly field: string | null = null,
  ) {
    super(message);
  }
}

export class ValidationError extends DecodeError {
  override name = "ValidationError";
}

export class MessageTooLarge extends DecodeError {
  override name = "MessageTooLarge";
  constructor(
    readonly size: number,
    readonly limit: number,
  ) {
    super(`message body is ${size} bytes, over the limit of ${limit} bytes`);
  }
}

export class TransportError extends SdkError {
  override name = "TransportError";
  constructor(
    message: string,
    readonly retryable = true,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export class CommandFailed extends SdkError {
  override name = "CommandFailed";
  constructor(readonly error: WireStandardError) {
    super(`${error.code}: ${error.message}`);
  }

  get code(): ErrorCode {
    return this.error.code;
  }
}

export class CoordinatorUnavailable extends SdkError {
  override name = "CoordinatorUnavailable";
}

/** The coordinator answered, every attempt, that its event store is unavailable
 * (`STORE_UNAVAILABLE`): nothing was stored, and the same call may be made again
 * later. `error` is the last refusal. */
export class StoreUnavailable extends CoordinatorUnavailable {
  override name = "StoreUnavailable";
  readonly retryable = true;
  constructor(
    message: string,
    readonly error: WireStandardError,
  ) {
    super(message);
  }
}
