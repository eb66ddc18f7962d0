"""The command line's settings, and every sessionbus setting in one table.

``SessionctlSettings`` is what ``sessionctl`` reads: the coordinator's settings plus
the broker endpoints ``sessionctl queues`` asks. They are read once per command line,
from the environment, the first time an option needs one (``current``); a flag given
overrides its variable (``option``). ``markdown()`` renders the README's
configuration table from the declarations of every program's settings
(``python -m sessionctl.settings`` or ``sessionctl config --markdown`` prints it).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import click

from coordinator.service.settings import CoordinatorSettings, Port
from reference_modules.settings import ReferenceModuleSettings
from transport.settings import Settings, SettingsError, markdown_table, setting

__all__ = ["EVERY_PROGRAM", "SessionctlSettings", "current", "markdown", "option"]


@dataclass(frozen=True, kw_only=True)
class SessionctlSettings(CoordinatorSettings):
    """What ``sessionctl`` is told, beyond the coordinator's settings."""

    management_url: str | None = setting(
        "SESSIONBUS_MANAGEMENT_URL",
        None,
        "the broker's management API for `sessionctl queues` (credentials from the AMQP "
        "URL when the URL has none); never guessed from the AMQP URL",
    )
    prometheus_url: str | None = setting(
        "SESSIONBUS_PROMETHEUS_URL",
        None,
        "the broker's `rabbitmq_prometheus` endpoint for `sessionctl queues` (figures and "
        "rates, where RabbitMQ 4 keeps them); never guessed from the AMQP URL",
    )
    console_port: Port | None = setting(
        "SESSIONBUS_CONSOLE_PORT",
        None,
        "the web console's port (0: any free port): `sessionctl console` listens on it, "
        "and `sessionctl coordinator` serves the console beside itself when it is set",
        shown="`sessionctl console`: 8470; the coordinator: off",
    )
    console_host: str = setting(
        "SESSIONBUS_CONSOLE_HOST",
        "127.0.0.1",
        "the address the web console listens on",
    )
    console_secret: str | None = setting(
        "SESSIONBUS_CONSOLE_SECRET",
        None,
        "signs the web console's cookies (shown as `***`)",
        shown="a random secret per process: sign-ins end with it",
    )


# Every program's settings; a variable two of them share is one row of the table.
EVERY_PROGRAM: tuple[type[Settings], ...] = (SessionctlSettings, ReferenceModuleSettings)


def markdown() -> str:
    """The README's configuration table."""
    return markdown_table(*EVERY_PROGRAM)


_META_KEY = "sessionbus.settings"
FC = TypeVar("FC", bound=Callable[..., Any])


def current(ctx: click.Context | None = None) -> SessionctlSettings:
    """This command line's settings from the environment, read once; a bad value is a
    usage error naming the variable."""
    root = (ctx or click.get_current_context()).find_root()
    if _META_KEY not in root.meta:
        try:
            root.meta[_META_KEY] = SessionctlSettings.from_env(os.environ)
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from exc
    settings = root.meta[_META_KEY]
    assert isinstance(settings, SessionctlSettings)
    return settings


def option(
    name: str, *param_decls: str, help: str | None = None, **attrs: Any
) -> Callable[[FC], FC]:
    """A click option for the setting ``name``: the flag if given, else its variable,
    else its default; ``--help`` names the variable and the default."""
    variable = dict(SessionctlSettings.variables())[name]
    default = {f.name: f.default for f in fields(SessionctlSettings)}[name]
    shown = variable.shown if variable.shown is not None else str(default)
    if default is None and variable.shown is None:
        shown = "none"
    text = help if help is not None else _plain(variable.meaning)
    text = f"{text}  [env var: {variable.name}; default: {_plain(shown)}]"

    def resolve(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        return getattr(current(ctx), name) if value is None else value

    return click.option(*param_decls, default=None, callback=resolve, help=text, **attrs)


def _plain(markdown_text: str) -> str:
    """Markdown's code spans as plain text, for ``--help``."""
    return re.sub(r"`([^`]*)`", r"\1", markdown_text)


if __name__ == "__main__":
    sys.stdout.write(markdown())
