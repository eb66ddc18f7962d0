"""Settings: every ``SESSIONBUS_*`` variable, declared once and read once.

A process reads its settings at its entry point (``Settings.from_env()``, or the
subclass of the program it is), with what its caller said — command-line flags,
keyword arguments — as overrides, and hands the values down: no library module reads
the environment. Flags override the environment, which overrides the defaults.

Each field is declared once with ``setting``: its variable, its default, its type (the
annotation, checked when the value is read) and a one-line meaning. The README's
configuration table is rendered from these declarations (``markdown_table``) and a test
keeps the two equal.

The fields every bus party needs live here, in the lowest layer that runs processes,
because the coordinator and the module SDK both use them; the coordinator, the
reference modules and the command line extend ``Settings`` with their own.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Self

import msgspec

from contracts.ids import PREFIX_PATTERN
from contracts.topology import DEFAULT_PREFIX, MAX_PARTITIONS, Topology

__all__ = [
    "DEFAULT_AMQP_URL",
    "Settings",
    "SettingsError",
    "Variable",
    "markdown_table",
    "setting",
]

DEFAULT_AMQP_URL: Final = "amqp://guest:guest@localhost:5672/"

# Where ``setting`` keeps a field's declaration in the dataclass field's metadata.
_KEY: Final = "sessionbus.setting"


class SettingsError(ValueError):
    """A ``SESSIONBUS_*`` variable, or an argument standing for one, holds a value its
    setting cannot take. Not a ``TransportError``: nothing reached the broker, and
    trying again will not mend a misconfigured process."""

    def __init__(self, source: str, value: object, expected: str) -> None:
        super().__init__(f"{source} must be {expected}, got {value!r}")
        self.source = source
        self.value = value
        self.expected = expected


@dataclass(frozen=True, slots=True)
class Variable:
    """One setting as the environment and the documentation know it."""

    name: str
    meaning: str
    # The default as the table shows it (markdown); ``None``: the default value itself.
    shown: str | None
    # What a valid value is, for an error message ("a whole number from 1 to 256").
    expected: str | None


def setting(
    variable: str,
    default: Any,
    meaning: str,
    *,
    shown: str | None = None,
    expected: str | None = None,
) -> Any:
    """Declare a settings field: its environment variable, default and meaning."""
    return dataclasses.field(
        default=default, metadata={_KEY: Variable(variable, meaning, shown, expected)}
    )


Prefix = Annotated[str, msgspec.Meta(pattern=PREFIX_PATTERN)]
Partitions = Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTITIONS)]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What every sessionbus process connected to the broker is told."""

    amqp_url: str = setting(
        "SESSIONBUS_AMQP_URL",
        DEFAULT_AMQP_URL,
        "RabbitMQ; the nodes of a cluster as comma-separated URLs",
    )
    prefix: Prefix = setting(
        "SESSIONBUS_PREFIX",
        DEFAULT_PREFIX,
        "topology prefix (exchanges and queues are `<prefix>.…`); read by the coordinator, "
        "`sessionctl`, the reference modules, `SessionManager.connect` and "
        "`CoordinatorClient.connect`",
        expected="lower-case letters, digits, '-' or '_', starting with a letter (at most 63)",
    )
    partitions: Partitions = setting(
        "SESSIONBUS_PARTITIONS",
        1,
        "command partitions (quorum queues `<prefix>.commands.<p>`); the same on every "
        "coordinator, module and client",
        expected=f"a whole number from 1 to {MAX_PARTITIONS}",
    )
    connection_name: str | None = setting(
        "SESSIONBUS_CONNECTION_NAME",
        None,
        "the RabbitMQ connection name a coordinator, module or client shows in the management UI",
        shown="`sessionbus-coordinator`, `sessionbus-module-<id>`, `sessionbus-client`",
    )
    log_level: str = setting(
        "SESSIONBUS_LOG_LEVEL", "WARNING", "log level: `DEBUG`, `INFO`, `WARNING` …"
    )
    log_format: Literal["text", "json"] = setting(
        "SESSIONBUS_LOG_FORMAT", "text", "log lines as `text` or `json`", expected="text or json"
    )

    # -- reading ----------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Self:
        """The settings from ``environ`` (default: this process's environment), with
        ``overrides`` (by field name; ``None`` means "not given") taking precedence.
        An empty variable counts as unset. Raises ``SettingsError`` naming the variable
        and the value."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable, kind in cls._fields():
            raw = environ.get(variable.name)
            if raw:
                values[name] = _convert(raw, kind, variable, variable.name, strict=False)
        return cls(**values).replace(**overrides)

    def replace(self, **overrides: Any) -> Self:
        """A copy with the ``overrides`` that are not ``None``, each checked as the
        environment's values are."""
        fields = {name: (variable, kind) for name, variable, kind in self._fields()}
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__} has no setting {name!r}")
            if value is not None:
                variable, kind = fields[name]
                changes[name] = _convert(value, kind, variable, name, strict=True)
        return dataclasses.replace(self, **changes) if changes else self

    def topology(self) -> Topology:
        """The topology these settings name."""
        return Topology(self.prefix, self.partitions)

    # -- describing -------------------------------------------------------------------

    @classmethod
    def variables(cls) -> list[tuple[str, Variable]]:
        """Every setting of this class (field name, declaration), in declaration order."""
        return [(name, variable) for name, variable, _ in cls._fields()]

    def source(self, environ: Mapping[str, str] | None = None) -> Iterator[tuple[str, Any, str]]:
        """(variable, value, where from) for every setting; ``where from`` is
        ``environment`` when the variable is set, else ``default`` or ``given``."""
        environ = os.environ if environ is None else environ
        for field in dataclasses.fields(self):
            variable = field.metadata.get(_KEY)
            if variable is None:
                continue
            value = getattr(self, field.name)
            if environ.get(variable.name):
                where = "environment"
            elif value == field.default:
                where = "default"
            else:
                where = "given"
            yield variable.name, value, where

    @classmethod
    def _fields(cls) -> Iterator[tuple[str, Variable, Any]]:
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            variable = field.metadata.get(_KEY)
            if variable is not None:
                yield field.name, variable, hints[field.name]


def _convert(value: Any, kind: Any, variable: Variable, source: str, *, strict: bool) -> Any:
    """``value`` as the field's type; ``strict=False`` parses text (the environment)."""
    try:
        return msgspec.convert(value, kind, strict=strict)
    except msgspec.ValidationError as exc:
        raise SettingsError(source, value, variable.expected or _expected(str(exc))) from None


def _expected(msgspec_message: str) -> str:
    """msgspec's own words, without the path it appends ("Expected `int`, got `str`")."""
    text = msgspec_message.split(" - at ", 1)[0]
    text = text.split(", got ", 1)[0]
    return text[0].lower() + text[1:] if text else "valid"


def markdown_table(*classes: type[Settings]) -> str:
    """The configuration table of the README: one row per variable of ``classes`` (a
    variable two classes share is shown once), in declaration order."""
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    seen: set[str] = set()
    for cls in classes:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, variable in cls.variables():
            if variable.name in seen:
                continue
            seen.add(variable.name)
            default = defaults[name]
            if variable.shown is not None:
                shown = variable.shown
            elif default is None:
                shown = "none"
            else:
                shown = f"`{default}`"
            lines.append(f"| `{variable.name}` | {variable.meaning} | {shown} |")
    return "\n".join(lines) + "\n"
