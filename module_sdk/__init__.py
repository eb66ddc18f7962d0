"""sessionbus module SDK: everything a module or a script imports, from one place.

Subclass ``SessionManager`` (two hooks) and run it with
``async with MyModule.connect() as manager``; call the coordinator from a script with
``async with CoordinatorClient.connect() as client``. Both read the same ``Settings``
(``SESSIONBUS_AMQP_URL``, ``SESSIONBUS_PREFIX`` …) for what they are not given. The
statuses, the data types the hooks and the client hand out, and the errors are
re-exported here from ``contracts`` and ``transport``; ``InProcessBus`` is a broker in
this process for a module's own tests (``module_sdk.testing``).
"""

from contracts import (
    ACTIVE_STATUSES,
    DEFAULT_PREFIX,
    STATUS_MAPPINGS,
    CoordinatorHealth,
    ErrorCode,
    EventEnvelope,
    ModuleInfo,
    ModuleSessionConfig,
    ModuleSessionInfo,
    RepairResult,
    SessionHistory,
    SessionIntegrityReport,
    SessionManagerHealth,
    SessionStatus,
    StandardError,
    Topology,
    WorkflowConfig,
    WorkflowSession,
)
from module_sdk.client import CoordinatorClient, SessionsSnapshot
from module_sdk.consumer import ConsumerStats, EventConsumer
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, SdkError, StoreUnavailable
from module_sdk.manager import SessionLifecycleCallbacks, SessionManager
from module_sdk.testing import InProcessBus
from transport.port import TransportError
from transport.settings import Settings, SettingsError

__all__ = [
    "ACTIVE_STATUSES",
    "DEFAULT_PREFIX",
    "STATUS_MAPPINGS",
    "CommandFailed",
    "ConsumerStats",
    "CoordinatorClient",
    "CoordinatorHealth",
    "CoordinatorUnavailable",
    "ErrorCode",
    "EventConsumer",
    "EventEnvelope",
    "InProcessBus",
    "ModuleInfo",
    "ModuleSessionConfig",
    "ModuleSessionInfo",
    "RepairResult",
    "SdkError",
    "SessionHistory",
    "SessionIntegrityReport",
    "SessionLifecycleCallbacks",
    "SessionManager",
    "SessionManagerHealth",
    "SessionStatus",
    "SessionsSnapshot",
    "Settings",
    "SettingsError",
    "StandardError",
    "StoreUnavailable",
    "Topology",
    "TransportError",
    "WorkflowConfig",
    "WorkflowSession",
]
