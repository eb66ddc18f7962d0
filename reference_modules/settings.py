"""The reference modules' settings: the bus settings plus frontend-api's HTTP face."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from transport.settings import Settings, setting

__all__ = ["ReferenceModuleSettings"]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


@dataclass(frozen=True, kw_only=True)
class ReferenceModuleSettings(Settings):
    """What ``python -m reference_modules NAME`` is told, beyond the bus settings."""

    http_port: Port | None = setting(
        "SESSIONBUS_HTTP_PORT",
        None,
        "frontend-api only: serve its HTTP API on this port (`--http-port`)",
        shown="off",
        expected="a port number from 0 to 65535",
    )
    http_host: str = setting(
        "SESSIONBUS_HTTP_HOST", "127.0.0.1", "the address frontend-api's HTTP API listens on"
    )
