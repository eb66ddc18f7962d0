"""Identifiers. Every session id is a UUID (seed validation rule 1)."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec

from contracts.errors import ValidationError

__all__ = [
    "MODULE_ID_PATTERN",
    "PREFIX_PATTERN",
    "REGISTRY_ID",
    "ModuleId",
    "SessionId",
    "new_id",
    "parse_module_id",
    "parse_session_id",
]

# Lower-case kebab case, as the seed's module ids ("ai-context-manager"). The id is also
# part of queue names and routing keys, so no dots, spaces or wildcards. msgspec matches
# with re.search, where "$" also matches before a trailing newline: "(?!\n)" closes that
# gap and means nothing to JSON Schema's ECMA regexes, where "$" is already the very end.
MODULE_ID_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$(?!\n)"
# A topology prefix becomes the first segment of every exchange and queue name.
PREFIX_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"

ModuleId = Annotated[str, msgspec.Meta(pattern=MODULE_ID_PATTERN, max_length=64)]
SessionId = uuid.UUID

# The module registry is event-sourced like a session; its stream has a fixed id.
REGISTRY_ID = uuid.uuid5(uuid.NAMESPACE_URL, "urn:sessionbus:module-registry")


def new_id() -> uuid.UUID:
    """A fresh random (version 4) UUID for sessions, events and commands."""
    return uuid.uuid4()


def parse_session_id(value: str | uuid.UUID, *, field: str = "session_id") -> uuid.UUID:
    """Parse a session id, raising ``ValidationError`` that names ``field``."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValidationError(f"{field} must be a UUID, got {value!r}", field=field) from exc


def parse_module_id(value: str, *, field: str = "module_id") -> str:
    """Check a module id against ``MODULE_ID_PATTERN``."""
    try:
        return msgspec.convert(value, ModuleId)
    except msgspec.ValidationError as exc:
        raise ValidationError(
            f"{field} must be lower-case kebab case (e.g. 'task-loop'), got {value!r}",
            field=field,
        ) from exc
