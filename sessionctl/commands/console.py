"""``sessionctl console``: the web console on its own (``sessionctl coordinator
--console-port`` serves it beside a coordinator; ``sessionctl.commands.run``)."""

from __future__ import annotations

import asyncio
import os
import signal

import click

from sessionctl import settings
from sessionctl.commands.common import (
    AMQP_URL_HELP,
    EXIT_USAGE,
    fail,
    prefix_option,
    topology_for,
)
from sessionctl.commands.run import console_secret
from transport.amqp import redact_url

# Where ``sessionctl console`` listens unless told (SESSIONBUS_CONSOLE_PORT, --port).
CONSOLE_PORT = 8470
# How much lower the console's own process runs than it was started (``--nice``).
CONSOLE_NICE = 10


@click.command("console")
@settings.option(
    "amqp_url",
    "--amqp-url",
    help=AMQP_URL_HELP + ". People sign in with their own user on it; this URL's user "
    "follows the events for the live updates.",
)
@prefix_option
@settings.option("console_host", "--host", help="Address to listen on.")
@settings.option(
    "console_port",
    "--port",
    type=click.IntRange(0, 65535),
    help=f"Port to listen on (0: any free port; unset: {CONSOLE_PORT}).",
)
@settings.option(
    "management_url",
    "--management-url",
    help="RabbitMQ management API for the queues page (as `sessionctl queues`).",
)
@settings.option(
    "prometheus_url",
    "--prometheus-url",
    help="rabbitmq_prometheus endpoint for the queues page (as `sessionctl queues`).",
)
@click.option(
    "--idle-timeout",
    type=click.IntRange(1),
    default=3600,
    show_default=True,
    help="Seconds before an idle sign-in is closed (and its broker connection).",
)
@click.option("--secure-cookies", is_flag=True, help="Mark cookies Secure (behind an HTTPS proxy).")
@click.option(
    "--sign-in-failures",
    type=click.IntRange(1),
    help="Failed sign-ins of one user name, or from one address, within --sign-in-window "
    "before further attempts are refused (429) without asking the broker.  [default: 5]",
)
@click.option(
    "--sign-in-window",
    type=click.FloatRange(min=1),
    help="Seconds within which failed sign-ins are counted.  [default: 300]",
)
@click.option(
    "--sign-in-lockout",
    type=click.FloatRange(min=1),
    help="Seconds a limited user name or address waits; doubled with each further lock, "
    "up to --sign-in-max-lockout.  [default: 60]",
)
@click.option(
    "--sign-in-max-lockout",
    type=click.FloatRange(min=1),
    help="The longest wait after repeated locks, in seconds.  [default: 900]",
)
@click.option(
    "--nice",
    type=click.IntRange(0, 19),
    default=CONSOLE_NICE,
    show_default=True,
    help="Lower the console's CPU priority by this much (0: as started), so that on a "
    "busy host the coordinator and the modules come first.",
)
def console(
    amqp_url: str,
    prefix: str,
    host: str,
    port: int | None,
    management_url: str | None,
    prometheus_url: str | None,
    idle_timeout: int,
    secure_cookies: bool,
    sign_in_failures: int | None,
    sign_in_window: float | None,
    sign_in_lockout: float | None,
    sign_in_max_lockout: float | None,
    nice: int,
) -> None:
    """Serve the web console: sessions, history, modules, queues, dead letters."""
    if nice:
        # A viewer: its live feed costs CPU for every event published, and on a host
        # that the coordinator keeps busy that CPU would be taken from the coordinator.
        # With a lower priority the console waits instead (its pages take a little
        # longer then; nothing is lost, its queue holds the events meanwhile).
        os.nice(nice)
    # The web stack is loaded only where a console is served.
    from sessionctl.console import ConsoleServer, ConsoleSettings  # noqa: PLC0415
    from sessionctl.console.limits import SignInLimits  # noqa: PLC0415

    topology = topology_for(prefix)
    # Unset options take the console's own defaults (no value is ever 0: the ranges).
    defaults = SignInLimits()
    window = sign_in_window or defaults.window
    max_lockout = sign_in_max_lockout or defaults.max_lockout
    try:
        limits = SignInLimits(
            failures=sign_in_failures or defaults.failures,
            window=window,
            lockout=sign_in_lockout or defaults.lockout,
            max_lockout=max_lockout,
            # A window or lock longer than the default forget time keeps its keys as long.
            forget_after=max(defaults.forget_after, window, max_lockout),
        )
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    console_settings = ConsoleSettings(
        amqp_url=amqp_url,
        topology=topology,
        management_url=management_url,
        prometheus_url=prometheus_url,
        secret=console_secret(),
        idle_timeout=float(idle_timeout),
        secure_cookies=secure_cookies,
        sign_in_limits=limits,
    )
    listen = CONSOLE_PORT if port is None else port

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with ConsoleServer(console_settings, host, listen) as server:
            click.echo(
                f"sessionbus console on {server.url}/ (broker {redact_url(amqp_url)}, "
                f"prefix {topology.prefix!r}); ready",
                err=True,
            )
            await stop.wait()
        click.echo("sessionbus console: stopped", err=True)

    try:
        asyncio.run(go())
    except OSError as exc:
        fail(f"console on {host}:{listen}: {exc}", EXIT_USAGE)
