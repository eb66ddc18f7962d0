"""Reading query strings and forms: every value checked, every refusal a ``BadInput``
that names the field and what it takes."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

import contracts
from contracts import SessionsCursor, SessionStatus
from sessionctl.console.errors import BadInput

__all__ = [
    "MAX_FORM_BYTES",
    "SessionFilters",
    "parse_cursor",
    "parse_flag",
    "parse_form",
    "parse_int",
    "parse_module",
    "parse_status",
    "parse_time",
    "parse_uuid",
]

# A form of the console is a few fields; anything larger is not one of ours.
MAX_FORM_BYTES = 64 * 1024
_TRUE = {"1", "on", "true", "yes"}
_FALSE = {"", "0", "off", "false", "no"}


def parse_form(body: bytes, content_type: str | None) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body, field -> values."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadInput(f"expected a form (application/x-www-form-urlencoded), got {kind!r}")
    if len(body) > MAX_FORM_BYTES:
        raise BadInput(f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("ascii")
        return urllib.parse.parse_qs(
            text, keep_blank_values=True, max_num_fields=1000, errors="strict"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"the form cannot be read: {exc}") from exc


def parse_status(text: str | None) -> SessionStatus | None:
    if not text:
        return None
    try:
        return SessionStatus(text)
    except ValueError:
        names = ", ".join(s.value for s in SessionStatus)
        raise BadInput(f"status: {text!r} is not a status (one of {names})") from None


def parse_module(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return contracts.parse_module_id(text)
    except (ValueError, contracts.ContractsError) as exc:
        raise BadInput(f"module: {text!r} is not a module id ({exc})") from None


def parse_uuid(text: str | None, name: str) -> uuid.UUID | None:
    if not text:
        return None
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise BadInput(
            f"{name}: {text!r} is not an id (a UUID such as {uuid.UUID(int=0)})"
        ) from None


def parse_time(text: str | None, name: str) -> datetime | None:
    """ISO 8601 (``2026-12-03T12:00``, ``…Z``, ``…+01:00``, or a date); UTC when it
    names no zone."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(
            f"{name}: {text!r} is not a date and time (YYYY-MM-DDTHH:MM[:SS], UTC unless "
            "it names its offset)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_int(text: str | None, name: str, low: int, high: int) -> int | None:
    if not text:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise BadInput(f"{name}: {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise BadInput(f"{name}: {value} is out of range ({low} to {high})")
    return value


def parse_flag(text: str | None, name: str) -> bool:
    value = (text or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadInput(f"{name}: {text!r} is neither on nor off (1 or 0)")


def parse_cursor(text: str | None) -> SessionsCursor | None:
    """``<created, microseconds since the epoch>.<session id>``, as the next-page link
    writes it."""
    if not text:
        return None
    created, _, sid = text.partition(".")
    try:
        return SessionsCursor(created_us=int(created), session_id=uuid.UUID(sid))
    except ValueError:
        raise BadInput(f"after: {text!r} is not a page cursor") from None


def format_cursor(cursor: SessionsCursor) -> str:
    return f"{cursor.created_us}.{cursor.session_id}"


# Largest ``stale`` in minutes (a year).
_MAX_STALE = 525_600


@dataclass(frozen=True)
class SessionFilters:
    """The sessions list's filters, as the query string gives them."""

    status: SessionStatus | None = None
    module: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    errors: bool = False
    stale: int | None = None  # minutes without activity
    q: uuid.UUID | None = None
    order: str = "newest"
    limit: int = 50
    after: SessionsCursor | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> SessionFilters:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(query) - known)
        if unknown:
            raise BadInput(f"unknown parameter(s): {', '.join(unknown)}")
        order = query.get("order") or "newest"
        if order not in {"newest", "oldest"}:
            raise BadInput(f"order: {order!r} is neither newest nor oldest")
        created_from = parse_time(query.get("created_from"), "created_from")
        created_to = parse_time(query.get("created_to"), "created_to")
        if created_from and created_to and created_to <= created_from:
            raise BadInput("created_to must be later than created_from")
        return cls(
            status=parse_status(query.get("status")),
            module=parse_module(query.get("module")),
            created_from=created_from,
            created_to=created_to,
            errors=parse_flag(query.get("errors"), "errors"),
            stale=parse_int(query.get("stale"), "stale", 1, _MAX_STALE),
            q=parse_uuid(query.get("q"), "q"),
            order=order,
            limit=parse_int(query.get("limit"), "limit", 1, 500) or 50,
            after=parse_cursor(query.get("after")),
        )

    def idle_since(self, now: datetime) -> datetime | None:
        return None if self.stale is None else now - timedelta(minutes=self.stale)

    def query(self, *, after: SessionsCursor | None = None) -> str:
        """The query string of these filters (another page: ``after``)."""
        pairs: Sequence[tuple[str, str | None]] = (
            ("status", self.status.value if self.status else None),
            ("module", self.module),
            ("created_from", _iso(self.created_from)),
            ("created_to", _iso(self.created_to)),
            ("errors", "1" if self.errors else None),
            ("stale", str(self.stale) if self.stale else None),
            ("q", str(self.q) if self.q else None),
            ("order", self.order if self.order != "newest" else None),
            ("limit", str(self.limit) if self.limit != 50 else None),
            ("after", format_cursor(after) if after else None),
        )
        return urllib.parse.urlencode([(k, v) for k, v in pairs if v])

    @property
    def filtered(self) -> bool:
        return self != SessionFilters(order=self.order, limit=self.limit, after=self.after)


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S") if value else None
