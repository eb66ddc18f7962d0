"""The console's exceptions: each one is a page with a status and a plain message."""

from __future__ import annotations

__all__ = [
    "BadInput",
    "ConsoleError",
    "CsrfRefused",
    "Forbidden",
    "NotFound",
    "SignInFailed",
    "TooManySignIns",
]


class ConsoleError(Exception):
    """Base of the console's errors; ``status`` is the HTTP status of its page."""

    status = 500
    title = "Something went wrong"


class BadInput(ConsoleError):
    """A form field or query parameter the console cannot take (400)."""

    status = 400
    title = "Bad input"


class CsrfRefused(ConsoleError):
    """An action without this sign-in's form token (403): nothing was done."""

    status = 403
    title = "Refused"


class Forbidden(ConsoleError):
    """The coordinator's identity rules do not let this person do that (403)."""

    status = 403
    title = "Refused"


class NotFound(ConsoleError):
    """No such page or session (404)."""

    status = 404
    title = "Not found"


class SignInFailed(ConsoleError):
    """The broker did not take the user and password, or cannot be reached (401)."""

    status = 401
    title = "Sign-in failed"


class TooManySignIns(SignInFailed):
    """Too many failed sign-ins for this user or from this address (429): the broker
    was not asked; ``retry_after`` says in how many seconds to try again."""

    status = 429
    title = "Too many sign-ins"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
