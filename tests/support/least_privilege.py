"""Broker users with exactly the permissions a deployment gives them (for example
``sessionctl.definitions.module_permissions``), made through the management API of
the shared test broker and deleted afterwards."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator, Mapping

from tests.support.broker_admin import delete_user, management

__all__ = ["restricted_users"]

_VHOST = "%2F"


@contextlib.contextmanager
def restricted_users(
    permissions: Mapping[str, Mapping[str, str]], password: str
) -> Iterator[list[str]]:
    """Users ``name -> {"configure", "write", "read"}`` on ``/`` for the block."""
    made: list[str] = []
    try:
        for name, perms in permissions.items():
            quoted = urllib.parse.quote(name, safe="")
            management("PUT", f"/api/users/{quoted}", {"password": password, "tags": ""})
            made.append(name)
            management(
                "PUT",
                f"/api/permissions/{_VHOST}/{quoted}",
                {"configure": perms["configure"], "write": perms["write"], "read": perms["read"]},
            )
        yield made
    finally:
        for name in made:
            delete_user(name)
