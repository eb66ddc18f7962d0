"""Administering the test broker through its management API: users, permissions and
connections. A test that must cut a connection gives that party a broker user of its
own and closes that user's connections, so it disturbs nobody else on the broker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support import services

__all__ = [
    "broker_user",
    "close_user_connections",
    "create_user",
    "delete_user",
    "management",
    "user_connections",
    "user_url",
]

_VHOST = "%2F"


def management(
    method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
) -> Any:
    """One management API call on the test broker; the decoded JSON answer, if any."""
    base = urllib.parse.urlsplit(services.management_target())
    path, _, query = path.partition("?")
    url = urllib.parse.urlunsplit(
        base._replace(netloc=f"{base.hostname}:{base.port}", path=path, query=query)
    )
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 - test broker
    auth = f"{base.username or 'guest'}:{base.password or 'guest'}"
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        payload = response.read()
    return json.loads(payload) if payload else None


def create_user(name: str, password: str) -> None:
    """A broker user with full permissions on ``/`` (what a module's user gets). The
    management API does what ``rabbitmqctl add_user`` + ``set_permissions`` do, in
    milliseconds rather than a second per call, and on a broker in a container too."""
    quoted = urllib.parse.quote(name, safe="")
    management("PUT", f"/api/users/{quoted}", {"password": password, "tags": ""})
    management(
        "PUT",
        f"/api/permissions/{_VHOST}/{quoted}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )


def delete_user(name: str) -> None:
    """Remove a broker user (the broker closes its connections); missing is fine."""
    with contextlib.suppress(urllib.error.HTTPError):
        management("DELETE", f"/api/users/{urllib.parse.quote(name, safe='')}")


@contextlib.contextmanager
def broker_user(name: str, password: str) -> Iterator[str]:
    """A broker user for the duration of the block."""
    create_user(name, password)
    try:
        yield name
    finally:
        delete_user(name)


def user_url(amqp_url: str, user: str, password: str) -> str:
    """``amqp_url`` with other credentials."""
    parts = urllib.parse.urlsplit(amqp_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def user_connections(user: str) -> list[str]:
    """Broker names of the open connections of ``user``. Read from the broker's
    connection tracking, so a connection is listed as soon as it is open (the plain
    connection list waits for the next statistics round, seconds later)."""
    rows = management("GET", f"/api/connections/username/{urllib.parse.quote(user, safe='')}")
    return [str(row["name"]) for row in rows or []]


def close_user_connections(user: str, *, reason: str) -> list[str]:
    """Force-close every connection of ``user`` (as an operator or a network fault
    would) and return their broker names. Give each party of a test a broker user of
    its own, and this closes exactly that party's connection."""
    names = user_connections(user)
    if not names:
        raise AssertionError(f"broker user {user!r} has no open connection")
    management(
        "DELETE",
        f"/api/connections/username/{urllib.parse.quote(user, safe='')}",
        headers={"X-Reason": reason},
    )
    return names
