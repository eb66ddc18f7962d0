"""sessionbus module SDK: what a module imports to take part in session lifecycle.

Subclass ``SessionManager`` (two hooks), run it with ``async with``; call the
coordinator with ``CoordinatorClient``. ``module_sdk.testing`` has the in-process bus.
"""

from module_sdk.client import CoordinatorClient
from module_sdk.consumer import ConsumerStats, EventConsumer
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, SdkError, StoreUnavailable
from module_sdk.manager import SessionLifecycleCallbacks, SessionManager

__all__ = [
    "CommandFailed",
    "ConsumerStats",
    "CoordinatorClient",
    "CoordinatorUnavailable",
    "EventConsumer",
    "SdkError",
    "SessionLifecycleCallbacks",
    "SessionManager",
    "StoreUnavailable",
]
