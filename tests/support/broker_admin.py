"""Administering the test broker through its management API: users, permissions and
connections. Connections are found and closed by the name the client gave them
(``connection_name``), so a test disturbs only its own.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support import services

__all__ = [
    "broker_user",
    "close_connection",
    "connections_named",
    "create_user",
    "delete_user",
    "management",
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


def connections_named(connection_name: str) -> list[dict[str, Any]]:
    """Open connections whose client-provided name is ``connection_name``."""
    rows = management("GET", "/api/connections?columns=name,user,client_properties.connection_name")
    return [
        row
        for row in rows or []
        if (row.get("client_properties") or {}).get("connection_name") == connection_name
    ]


def close_connection(connection_name: str, *, reason: str, timeout: float = 15.0) -> str:
    """Force-close the connection with this client-provided name (as an operator or a
    network fault would); returns the broker's name of the connection closed. Waits
    (bounded) for the connection to appear in the management API first."""
    deadline = time.monotonic() + timeout
    while True:
        rows = connections_named(connection_name)
        if rows:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no connection named {connection_name!r} on the broker")
        time.sleep(0.05)
    if len(rows) != 1:
        raise AssertionError(f"{len(rows)} connections are named {connection_name!r}")
    name = str(rows[0]["name"])
    management(
        "DELETE",
        f"/api/connections/{urllib.parse.quote(name, safe='')}",
        headers={"X-Reason": reason},
    )
    return name
