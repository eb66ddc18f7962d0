"""Encoding and strict decoding of every message, JSON by default or msgpack.

One ``Codec`` per format keeps one reused ``Decoder`` per message type. Every failure
becomes an exception from ``contracts.errors`` naming the offending field.
"""

from __future__ import annotations

import threading
from typing import Any, Final, Literal, TypeVar, cast

import msgspec

from contracts.commands import CommandReply, CommandRequest
from contracts.errors import (
    DecodeError,
    EncodeError,
    MessageTooLarge,
    ValidationError,
    field_path,
)
from contracts.events import EventEnvelope
from contracts.model import Heartbeat

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_BODY",
    "JSON",
    "MSGPACK",
    "Codec",
    "Format",
    "codec_for",
]

T = TypeVar("T")
Format = Literal["json", "msgpack"]

JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"
CONTENT_TYPES: Final[dict[Format, str]] = {"json": JSON, "msgpack": MSGPACK}
# Session messages are small; a megabyte is far past any legitimate one and well under
# RabbitMQ's own limit, so an over-size body is refused before parsing.
DEFAULT_MAX_BODY: Final = 1 << 20


class Codec:
    """Encode messages to bytes and decode bytes strictly into typed messages."""

    def __init__(self, fmt: Format = "json", *, max_body: int = DEFAULT_MAX_BODY) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(CONTENT_TYPES)}")
        self.format: Format = fmt
        self.content_type = CONTENT_TYPES[fmt]
        self.max_body = max_body
        self._encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
            msgspec.json.Encoder() if fmt == "json" else msgspec.msgpack.Encoder()
        )
        self._decoders: dict[Any, msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Codec({self.format!r}, max_body={self.max_body})"

    def encode(self, message: Any) -> bytes:
        """Encode a message (any contracts Struct) to bytes."""
        try:
            return self._encoder.encode(message)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"cannot encode {type(message).__name__}: {exc}") from exc

    def decode(self, data: bytes | bytearray | memoryview, type_: type[T]) -> T:
        """Decode ``data`` into ``type_`` strictly; raise a ``DecodeError`` subclass."""
        size = len(data)
        if size > self.max_body:
            raise MessageTooLarge(size, self.max_body)
        decoder = self._decoder(type_)
        try:
            return cast(T, decoder.decode(data))
        except msgspec.ValidationError as exc:
            text = str(exc)
            raise ValidationError(text, field=field_path(text)) from exc
        except msgspec.DecodeError as exc:
            raise DecodeError(f"malformed {self.format} body: {exc}") from exc

    def decode_request(self, data: bytes | bytearray | memoryview) -> CommandRequest:
        """Decode a ``CommandRequest``."""
        return self.decode(data, CommandRequest)

    def decode_reply(self, data: bytes | bytearray | memoryview) -> CommandReply:
        """Decode a ``CommandReply``."""
        return self.decode(data, CommandReply)

    def decode_envelope(self, data: bytes | bytearray | memoryview) -> EventEnvelope:
        """Decode an ``EventEnvelope``."""
        return self.decode(data, EventEnvelope)

    def decode_heartbeat(self, data: bytes | bytearray | memoryview) -> Heartbeat:
        """Decode a ``Heartbeat``."""
        return self.decode(data, Heartbeat)

    def _decoder(self, type_: Any) -> msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]:
        decoder = self._decoders.get(type_)
        if decoder is None:
            with self._lock:
                decoder = self._decoders.get(type_)
                if decoder is None:
                    decoder = (
                        msgspec.json.Decoder(type_)
                        if self.format == "json"
                        else msgspec.msgpack.Decoder(type_)
                    )
                    self._decoders[type_] = decoder
        return decoder


_BY_CONTENT_TYPE: dict[str, Codec] = {}


def codec_for(content_type: str | None, *, max_body: int = DEFAULT_MAX_BODY) -> Codec:
    """The codec for an AMQP ``content_type`` (JSON when absent); ``DecodeError`` for an
    unknown one."""
    ct = (content_type or JSON).split(";", 1)[0].strip().lower()
    key = f"{ct}|{max_body}"
    codec = _BY_CONTENT_TYPE.get(key)
    if codec is None:
        for fmt, known in CONTENT_TYPES.items():
            if known == ct:
                codec = _BY_CONTENT_TYPE[key] = Codec(fmt, max_body=max_body)
                break
        else:
            raise DecodeError(f"unsupported content type {content_type!r}", field="content_type")
    return codec
