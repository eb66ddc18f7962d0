"""The SDK's one retry policy (tenacity), shared by the command client and the
lifecycle hooks: a bounded number of tries, pauses doubling from 50 ms, the last error
raised as it was."""

from __future__ import annotations

from typing import Final

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

__all__ = ["FIRST_PAUSE", "retrying"]

FIRST_PAUSE: Final = 0.05


def retrying(
    attempts: int,
    *,
    max_pause: float,
    on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
) -> AsyncRetrying:
    """At most ``attempts`` tries of what raises ``on``, pausing ``FIRST_PAUSE``, then
    twice as long each time up to ``max_pause``; anything else, or the last try's
    error, is raised as it is."""
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=FIRST_PAUSE, max=max_pause),
        retry=retry_if_exception_type(on),
        reraise=True,
    )
