"""W3C trace context across the bus, with OpenTelemetry when it is installed.

A command's correlation id is its trace id: the client takes it from the current
OpenTelemetry span (``pip install sessionbus[otel]``) when there is one, sends the
``traceparent`` header, and every event the command causes carries the same trace id in
its own ``traceparent``. Without OpenTelemetry the ids still flow; nothing is exported.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, MutableMapping
from typing import Any

from contracts.topology import HEADERS

__all__ = ["correlation_from_headers", "current_trace_id", "inject"]

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?P<trace>[0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

_propagate: Any
_trace: Any
try:  # optional extra
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised where the extra is absent
    _propagate = None
    _trace = None


def inject(headers: MutableMapping[str, Any]) -> None:
    """Add the current trace context (``traceparent``/``tracestate``) to headers."""
    if _propagate is not None:
        _propagate.inject(headers)


def current_trace_id() -> uuid.UUID | None:
    """The current OpenTelemetry trace id as a UUID, if a span is recording."""
    if _trace is None:
        return None
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return uuid.UUID(int=context.trace_id)


def correlation_from_headers(headers: Mapping[str, Any]) -> uuid.UUID | None:
    """The trace id of a ``traceparent`` header as a UUID, if well formed."""
    value = headers.get(HEADERS.TRACEPARENT)
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None or match["trace"] == "0" * 32:
        return None
    return uuid.UUID(hex=match["trace"])
