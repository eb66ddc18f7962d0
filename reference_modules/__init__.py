"""The seven reference modules of the seed, on the SDK.

Each creates an internal session of its kind when a workflow session starts (a
simulated browser, AI connection, stream …), reports activity, and cleans up on
CLEANUP. They are real module services: ``python -m reference_modules NAME`` runs one
in its own process. The executor-streamer is optional (the seed's ``streamId?``); the
others are required.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from contracts import ModuleSessionConfig, ModuleSessionInfo, WorkflowSession
from module_sdk.manager import SessionManager

__all__ = [
    "MODULES",
    "AIContextManager",
    "AIIntegration",
    "Executor",
    "ExecutorStreamer",
    "FrontendAPI",
    "ReferenceModule",
    "StepProcessor",
    "TaskLoop",
]


@dataclass
class InternalSession:
    """What a module holds for one workflow session."""

    kind: str
    workflow_session_id: uuid.UUID
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    detail: dict[str, Any] = field(default_factory=dict)


class ReferenceModule(SessionManager):
    """Common behaviour: keep internal sessions in memory, simulate set-up latency."""

    kind: ClassVar[str] = "session"
    setup_seconds: ClassVar[tuple[float, float]] = (0.0, 0.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.internal: dict[uuid.UUID, InternalSession] = {}
        self.destroyed = 0

    def describe(self, session: WorkflowSession) -> dict[str, Any]:
        return {}

    async def on_create(
        self, session: WorkflowSession, module_session_id: uuid.UUID, config: ModuleSessionConfig
    ) -> dict[str, Any]:
        low, high = self.setup_seconds
        if high > 0:
            await asyncio.sleep(random.uniform(low, high))  # noqa: S311 - simulated latency
        detail = self.describe(session)
        self.internal[module_session_id] = InternalSession(
            self.kind, session.session_id, detail=detail
        )
        return {"kind": self.kind, **detail}

    async def on_destroy(self, info: ModuleSessionInfo) -> None:
        if self.internal.pop(info.session_id, None) is not None:
            self.destroyed += 1


class AIContextManager(ReferenceModule):
    module_id = "ai-context-manager"
    kind = "context"

    def describe(self, session: WorkflowSession) -> dict[str, Any]:
        return {"steps": len(session.steps)}


class AIIntegration(ReferenceModule):
    module_id = "ai-integration"
    kind = "ai-connection"
    setup_seconds = (0.001, 0.005)

    def describe(self, session: WorkflowSession) -> dict[str, Any]:
        return {"provider": "simulated", "model": "reference"}


class Executor(ReferenceModule):
    module_id = "executor"
    kind = "browser"
    setup_seconds = (0.002, 0.01)

    def describe(self, session: WorkflowSession) -> dict[str, Any]:
        return {"engine": "simulated-chromium", "viewport": "1280x800"}


class TaskLoop(ReferenceModule):
    module_id = "task-loop"
    kind = "task-loop"


class StepProcessor(ReferenceModule):
    module_id = "step-processor"
    kind = "step-processor"


class ExecutorStreamer(ReferenceModule):
    module_id = "executor-streamer"
    kind = "stream"
    required = False

    def describe(self, session: WorkflowSession) -> dict[str, Any]:
        return {"codec": "simulated-h264"}


class FrontendAPI(ReferenceModule):
    module_id = "frontend-api"
    kind = "api-session"


MODULES: dict[str, type[ReferenceModule]] = {
    cls.module_id: cls
    for cls in (
        AIContextManager,
        AIIntegration,
        Executor,
        TaskLoop,
        StepProcessor,
        ExecutorStreamer,
        FrontendAPI,
    )
}
