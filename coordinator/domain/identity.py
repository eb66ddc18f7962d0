"""Who may act for which module: broker users mapped to principals.

The coordinator never trusts a message body for identity. RabbitMQ refuses a message
whose AMQP ``user_id`` is not the user of the connection that published it, so the
``user_id`` of a command is the authenticated broker user; this map says which module
ids that user may act for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from contracts import parse_module_id
from coordinator.domain.aggregates import Principal
from coordinator.errors import ConfigurationError

__all__ = ["IdentityMap"]

log = logging.getLogger("sessionbus.coordinator.identity")

ANY = "*"


class IdentityMap:
    """Broker user -> the module ids it may act for (``None``: any module).

    ``development(user)`` is the explicit single-shared-user mode: that one user may act
    for every module. It exists for a laptop and the demo, and says so in the log.
    """

    def __init__(self, users: Mapping[str, frozenset[str] | None]) -> None:
        self._principals = {user: Principal(user, modules) for user, modules in users.items()}
        self.development = False

    @classmethod
    def development_mode(cls, user: str = "guest") -> IdentityMap:
        identity = cls({user: None})
        identity.development = True
        return identity

    @classmethod
    def parse(cls, text: str) -> IdentityMap:
        """``user=module[,module…];user2=*;user3=`` — ``*`` may act for any module
        (operators, frontends that create sessions for everyone); nothing after ``=``
        may act for no module and only read (auditors)."""
        users: dict[str, frozenset[str] | None] = {}
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            user, sep, modules = entry.partition("=")
            if not sep or not user.strip():
                raise ConfigurationError(
                    f"identity entry {entry!r} must look like user=module[,module] or user=*"
                )
            names = [m.strip() for m in modules.split(",") if m.strip()]
            if names == [ANY]:
                users[user.strip()] = None
            else:
                try:
                    users[user.strip()] = frozenset(parse_module_id(m) for m in names)
                except ValueError as exc:
                    raise ConfigurationError(f"identity entry {entry!r}: {exc}") from exc
        if not users:
            raise ConfigurationError("identity map is empty")
        return cls(users)

    @classmethod
    def from_setting(cls, text: str | None, default_user: str = "guest") -> IdentityMap:
        """The map ``text`` writes out (the ``identity`` setting, ``SESSIONBUS_IDENTITY``)
        if any; otherwise development mode for ``default_user`` (which ``announce``
        logs once the service runs)."""
        if text:
            return cls.parse(text)
        return cls.development_mode(default_user)

    def announce(self) -> None:
        """Say so in the log when running in development mode (once serving)."""
        if self.development:
            log.warning(
                "development mode (no SESSIONBUS_IDENTITY): broker user(s) %s may act for "
                "every module",
                ", ".join(self.users()),
            )

    def principal_for(self, user_id: str | None) -> Principal | None:
        """The principal of an authenticated broker user, or ``None`` if unknown."""
        if user_id is None:
            return None
        return self._principals.get(user_id)

    def users(self) -> list[str]:
        return sorted(self._principals)
