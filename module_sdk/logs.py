"""Logging set-up shared by the coordinator and the modules.

Every sessionbus logger is under ``sessionbus``. Context such as ``session_id``,
``event_id``, ``command_id`` and ``module_id`` is passed as ``extra`` and shows up as
fields: appended ``key=value`` in text form, keys of their own in JSON form.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "TextFormatter", "configure_logging"]

CONTEXT_FIELDS: Final = (
    "session_id",
    "event_id",
    "command_id",
    "module_id",
    "position",
    "version",
    "correlation_id",
)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {
        name: str(value)
        for name in CONTEXT_FIELDS
        if (value := getattr(record, name, None)) is not None
    }


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value …``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = _context(record)
        if context:
            text += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line, context fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "WARNING", fmt: str = "text") -> None:
    """Root logging for a sessionbus process (``fmt``: ``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
