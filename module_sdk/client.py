"""``CoordinatorClient``: every SessionCoordinator method of the seed, over the bus.

Requests are msgspec-encoded ``CommandRequest``s sent to the commands queue with a
direct reply-to. A request that times out is sent again with the same command id (the
coordinator applies it once and answers every copy the same), up to ``attempts``.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

from contracts import (
    Accepted,
    Codec,
    Command,
    CommandRequest,
    CoordinatorHealth,
    CreateWorkflowSession,
    DecodeError,
    DestroyWorkflowSession,
    ErrorCode,
    EventsPage,
    FindWorkflowSessions,
    GetCoordinatorHealth,
    GetIdentity,
    GetLinkedSessions,
    GetSessionHistory,
    GetWorkflowSession,
    HealthResult,
    IdentityResult,
    IntegrityResult,
    LinkedSessions,
    LinkModuleSession,
    ListActiveWorkflowSessions,
    ListModules,
    ListWorkflowSessions,
    ModuleInfo,
    ModuleSessionConfig,
    ModulesResult,
    ReadEvents,
    RecordActivity,
    RegisterModule,
    RepairResult,
    RepairSessionIntegrity,
    ReportError,
    ReportOrphan,
    Result,
    SessionHistory,
    SessionIds,
    SessionIntegrityReport,
    SessionResult,
    SessionsCursor,
    SessionsPage,
    SessionStatus,
    StandardError,
    Topology,
    UnlinkModuleSession,
    UnregisterModule,
    UpdateSessionStatus,
    ValidateSessionIntegrity,
    WorkflowConfig,
    WorkflowSession,
    new_id,
)
from module_sdk.errors import CommandFailed, CoordinatorUnavailable, SdkError, StoreUnavailable
from module_sdk.retrying import FIRST_PAUSE, retrying
from transport.amqp import AmqpTransport
from transport.port import OutgoingMessage, Transport, TransportError
from transport.settings import Settings
from transport.tracing import current_trace_id, inject

__all__ = [
    "DEFAULT_CONNECTION_NAME",
    "CoordinatorClient",
    "SessionsSnapshot",
    "connection_settings",
]

R = TypeVar("R")


# The RabbitMQ connection name of a client that ``connect`` opens, unless set.
DEFAULT_CONNECTION_NAME = "sessionbus-client"
# Before the second attempt of a command; later ones back off exponentially.
FIRST_RETRY_PAUSE = FIRST_PAUSE
_requests = itertools.count(1)


@dataclass(frozen=True)
class SessionsSnapshot:
    """The live sessions, and the store position the listing reflects (0: unknown)."""

    sessions: list[WorkflowSession]
    position: int


class _Retryable(SdkError):
    """An attempt to try again: no reply, or a refusal marked retryable (``error``)."""

    def __init__(self, message: str, error: StandardError | None = None) -> None:
        super().__init__(message)
        self.error = error


def _gave_up(command: Command, attempts: int, exc: _Retryable) -> CoordinatorUnavailable:
    name = type(command).__name__
    if exc.error is not None and exc.error.code == ErrorCode.STORE_UNAVAILABLE:
        return StoreUnavailable(
            f"{name} refused {attempts} times, the coordinator's store is unavailable: "
            f"{exc.error.message}",
            exc.error,
        )
    if attempts <= 1:
        return CoordinatorUnavailable(f"{name} got no reply: {exc}")
    return CoordinatorUnavailable(f"{name} got no reply after {attempts} attempts: {exc}")


def connection_settings(
    settings: Settings | None, url: str | Sequence[str] | None, prefix: str | None
) -> Settings:
    """``settings`` (default: read from the environment now) with what the caller of a
    ``connect`` said: the broker (one URL, or a cluster's nodes) and the prefix."""
    if url is not None and not isinstance(url, str):
        url = ",".join(url)
    return (settings or Settings.from_env()).replace(amqp_url=url, prefix=prefix)


class CoordinatorClient:
    """Typed calls to the coordinator. ``user_id`` (default: the transport's user) is
    stamped on every request; the broker refuses one that does not match the
    connection, so the coordinator knows who is asking.

    ``async with CoordinatorClient.connect() as client: …`` from a script; on a
    transport of one's own, ``CoordinatorClient(transport, topology)``."""

    def __init__(
        self,
        transport: Transport,
        topology: Topology | None = None,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        codec: Codec | None = None,
        own_transport: bool = False,
    ) -> None:
        self.transport = transport
        self.topology = topology or Topology()
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.codec = codec or Codec("json")
        self.own_transport = own_transport

    @classmethod
    def connect(
        cls,
        url: str | Sequence[str] | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        connection_name: str | None = None,
        timeout: float = 10.0,
        attempts: int = 3,
        codec: Codec | None = None,
    ) -> Self:
        """A client on its own RabbitMQ connection, opened by ``async with`` and closed
        at its end, as ``SessionManager.connect`` makes a manager. What is not given
        comes from ``settings`` (default: read from the environment now,
        ``Settings.from_env()``): the broker from ``SESSIONBUS_AMQP_URL`` (one URL or a
        cluster's nodes), the prefix from ``SESSIONBUS_PREFIX``, the partitions from
        ``SESSIONBUS_PARTITIONS``, the connection name from
        ``SESSIONBUS_CONNECTION_NAME`` (else ``sessionbus-client``)."""
        settings = connection_settings(settings, url, prefix)
        name = connection_name or settings.connection_name or DEFAULT_CONNECTION_NAME
        transport = AmqpTransport(settings.amqp_url, connection_name=name)
        return cls(
            transport,
            settings.topology(),
            timeout=timeout,
            attempts=attempts,
            codec=codec,
            own_transport=True,
        )

    async def __aenter__(self) -> Self:
        if self.own_transport:
            await self.transport.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection ``connect`` opened (a transport given is the giver's
        to close). Safe to call twice."""
        if self.own_transport:
            await self.transport.close()

    async def call(
        self,
        command: Command,
        *,
        timeout: float | None = None,
        command_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
    ) -> Result:
        """Send one command and return its result; ``CommandFailed`` carries a refusal."""
        request = CommandRequest(
            command_id=command_id or new_id(),
            issued_at=datetime.now(UTC),
            command=command,
            correlation_id=correlation_id or current_trace_id(),
        )
        body = self.codec.encode(request)
        timeout = timeout or self.timeout
        # The first attempt outside tenacity: nearly every command needs no other, and
        # the retry machinery costs more than the call on the client's side.
        try:
            return await self._once(request, body, timeout)
        except _Retryable as exc:
            if self.attempts <= 1:
                raise _gave_up(command, 1, exc) from exc
        await asyncio.sleep(FIRST_RETRY_PAUSE)
        try:
            async for attempt in retrying(self.attempts - 1, max_pause=1.0, on=_Retryable):
                with attempt:
                    return await self._once(request, body, timeout)
        except _Retryable as exc:
            raise _gave_up(command, self.attempts, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, request: CommandRequest, body: bytes, timeout: float) -> Result:
        headers: dict[str, Any] = {}
        inject(headers)
        message = OutgoingMessage(
            body=body,
            content_type=self.codec.content_type,
            headers=headers,
            # Unique per request on this transport (its replies come only to it).
            correlation_id=f"r{next(_requests)}",
            message_id=str(request.command_id),
            user_id=self.transport.user,
            type=type(request.command).__name__,
            persistent=False,
        )
        try:
            queue = self.topology.command_queue_for(getattr(request.command, "session_id", None))
            delivery = await self.transport.request(queue, message, timeout=timeout)
        except TimeoutError as exc:
            raise _Retryable(f"no reply within {timeout} s") from exc
        except TransportError as exc:
            if exc.retryable:
                raise _Retryable(str(exc)) from exc
            raise
        try:
            reply = self.codec.decode_reply(delivery.body)
        except DecodeError as exc:
            raise SdkError(f"undecodable reply from the coordinator: {exc}") from exc
        if reply.error is not None:
            if reply.error.retryable:
                raise _Retryable(f"{reply.error.code}: {reply.error.message}", reply.error)
            raise CommandFailed(reply.error)
        assert reply.result is not None
        return reply.result

    async def _expect(self, command: Command, kind: type[R], **kwargs: Any) -> R:
        result = await self.call(command, **kwargs)
        if not isinstance(result, kind):
            raise SdkError(
                f"expected {kind.__name__}, the coordinator answered {type(result).__name__}"
            )
        return result

    # -- the seed's SessionCoordinator ------------------------------------------------

    async def create_workflow_session(
        self,
        steps: Sequence[str] = (),
        config: WorkflowConfig | None = None,
        *,
        session_id: uuid.UUID | None = None,
    ) -> WorkflowSession:
        """Create a workflow session. The id is chosen here so a retried create cannot
        make two sessions."""
        sid = session_id or new_id()
        await self._expect(
            CreateWorkflowSession(
                steps=list(steps), config=config or WorkflowConfig(), session_id=sid
            ),
            Accepted,
        )
        session = await self.get_workflow_session(sid)
        if session is None:
            raise SdkError(f"session {sid} was created but cannot be read back")
        return session

    async def destroy_workflow_session(
        self, session_id: uuid.UUID, reason: str | None = None
    ) -> None:
        await self._expect(DestroyWorkflowSession(session_id=session_id, reason=reason), Accepted)

    async def get_workflow_session(self, session_id: uuid.UUID) -> WorkflowSession | None:
        result = await self._expect(GetWorkflowSession(session_id=session_id), SessionResult)
        return result.session

    async def list_active_workflow_sessions(
        self, status: SessionStatus | None = None, module_id: str | None = None
    ) -> list[uuid.UUID]:
        result = await self._expect(
            ListActiveWorkflowSessions(status=status, module_id=module_id), SessionIds
        )
        return result.session_ids

    async def list_workflow_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        module_id: str | None = None,
        page_size: int = 500,
    ) -> list[WorkflowSession]:
        """Every session not destroyed, with full state, fetched page by page."""
        listing = await self.snapshot_workflow_sessions(
            status=status, module_id=module_id, page_size=page_size
        )
        return listing.sessions

    async def snapshot_workflow_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        module_id: str | None = None,
        page_size: int = 500,
    ) -> SessionsSnapshot:
        """Every session not destroyed, page by page, each page after the last one's
        key (creation time, id): a session that stays live through the listing is in
        it, however many others are created or destroyed meanwhile. ``position`` is
        the store position the first page reflected: any event at or before it of a
        session not listed belongs to a session destroyed by the time its page was
        read."""
        sessions: list[WorkflowSession] = []
        position: int | None = None
        after: SessionsCursor | None = None
        offset: int | None = 0
        while True:
            page = await self._expect(
                ListWorkflowSessions(
                    status=status,
                    module_id=module_id,
                    offset=offset or 0,
                    limit=page_size,
                    after=after,
                ),
                SessionsPage,
            )
            if position is None:
                position = page.position
            sessions.extend(page.sessions)
            if page.next_after is not None:
                after = page.next_after
            elif page.next_offset is not None and after is None:
                offset = page.next_offset  # a coordinator that pages by offset only
            else:
                return SessionsSnapshot(sessions=sessions, position=position)

    async def page_workflow_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        module_id: str | None = None,
        limit: int = 50,
        after: SessionsCursor | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        has_errors: bool = False,
        idle_since: datetime | None = None,
        match_id: uuid.UUID | None = None,
        newest_first: bool = False,
    ) -> SessionsPage:
        """One page of the sessions not destroyed, filtered (see ``ListWorkflowSessions``
        for each filter); the next page is the one ``after`` this one's
        ``next_after`` (``None`` on the last page)."""
        return await self._expect(
            ListWorkflowSessions(
                status=status,
                module_id=module_id,
                limit=limit,
                after=after,
                created_from=created_from,
                created_to=created_to,
                has_errors=has_errors,
                idle_since=idle_since,
                match_id=match_id,
                newest_first=newest_first,
            ),
            SessionsPage,
        )

    async def find_workflow_sessions(
        self, match_id: uuid.UUID, *, limit: int = 100
    ) -> list[WorkflowSession]:
        """Every workflow session, live or destroyed, whose id is ``match_id`` or that
        had a module session with that id linked at any time, newest first (see
        ``FindWorkflowSessions``); a destroyed one has ``destroyed`` set. A coordinator
        that predates the query answers ``CommandFailed`` (INVALID_MESSAGE)."""
        page = await self._expect(
            FindWorkflowSessions(match_id=match_id, limit=limit), SessionsPage
        )
        return page.sessions

    async def register_module(
        self, module_id: str, *, required: bool = True, capabilities: Sequence[str] = ()
    ) -> Accepted:
        return await self._expect(
            RegisterModule(module_id=module_id, required=required, capabilities=list(capabilities)),
            Accepted,
        )

    async def unregister_module(self, module_id: str, reason: str | None = None) -> Accepted:
        return await self._expect(UnregisterModule(module_id=module_id, reason=reason), Accepted)

    async def list_modules(self) -> list[ModuleInfo]:
        return (await self._expect(ListModules(), ModulesResult)).modules

    async def get_module(self, module_id: str) -> ModuleInfo | None:
        """Seed: getModuleSessionManager — over the bus, what the coordinator knows."""
        for info in await self.list_modules():
            if info.module_id == module_id:
                return info
        return None

    async def link_module_session(
        self,
        workflow_session_id: uuid.UUID,
        module_id: str,
        module_session_id: uuid.UUID,
        *,
        config: ModuleSessionConfig | None = None,
        metadata: dict[str, Any] | None = None,
        command_id: uuid.UUID | None = None,
    ) -> Accepted:
        """Link a module session. ``command_id``: the same one for every try of one
        link, so a try after a lost reply gets the first one's answer."""
        return await self._expect(
            LinkModuleSession(
                session_id=workflow_session_id,
                module_id=module_id,
                module_session_id=module_session_id,
                config=config or ModuleSessionConfig(),
                metadata=metadata or {},
            ),
            Accepted,
            command_id=command_id,
        )

    async def unlink_module_session(
        self,
        workflow_session_id: uuid.UUID,
        module_id: str,
        reason: str | None = None,
        *,
        command_id: uuid.UUID | None = None,
    ) -> Accepted:
        return await self._expect(
            UnlinkModuleSession(session_id=workflow_session_id, module_id=module_id, reason=reason),
            Accepted,
            command_id=command_id,
        )

    async def get_linked_sessions(self, workflow_session_id: uuid.UUID) -> dict[str, uuid.UUID]:
        result = await self._expect(
            GetLinkedSessions(session_id=workflow_session_id), LinkedSessions
        )
        return result.links

    async def update_session_status(
        self,
        session_id: uuid.UUID,
        status: SessionStatus,
        *,
        module_id: str | None = None,
        reason: str | None = None,
    ) -> Accepted:
        return await self._expect(
            UpdateSessionStatus(
                session_id=session_id, status=status, module_id=module_id, reason=reason
            ),
            Accepted,
        )

    async def record_activity(
        self, session_id: uuid.UUID, module_id: str | None = None
    ) -> Accepted:
        return await self._expect(
            RecordActivity(session_id=session_id, module_id=module_id), Accepted
        )

    async def report_error(
        self,
        session_id: uuid.UUID,
        error: StandardError,
        *,
        module_id: str | None = None,
        fatal: bool = True,
    ) -> Accepted:
        return await self._expect(
            ReportError(session_id=session_id, error=error, module_id=module_id, fatal=fatal),
            Accepted,
        )

    async def report_orphan(
        self, session_id: uuid.UUID, module_id: str, module_session_id: uuid.UUID
    ) -> Accepted:
        return await self._expect(
            ReportOrphan(
                session_id=session_id, module_id=module_id, module_session_id=module_session_id
            ),
            Accepted,
        )

    async def get_coordinator_health(self) -> CoordinatorHealth:
        return (await self._expect(GetCoordinatorHealth(), HealthResult)).health

    async def get_identity(self) -> IdentityResult:
        """Who the coordinator takes this client's broker user for, and what it may do."""
        return await self._expect(GetIdentity(), IdentityResult)

    async def validate_session_integrity(self, session_id: uuid.UUID) -> SessionIntegrityReport:
        return (
            await self._expect(ValidateSessionIntegrity(session_id=session_id), IntegrityResult)
        ).report

    async def repair_session_integrity(self, session_id: uuid.UUID) -> RepairResult:
        return await self._expect(RepairSessionIntegrity(session_id=session_id), RepairResult)

    async def get_session_history(
        self, session_id: uuid.UUID, *, as_of: datetime | None = None, version: int | None = None
    ) -> SessionHistory:
        return await self._expect(
            GetSessionHistory(session_id=session_id, as_of=as_of, version=version), SessionHistory
        )

    async def read_events(
        self, after_position: int = 0, limit: int = 1000, session_id: uuid.UUID | None = None
    ) -> EventsPage:
        return await self._expect(
            ReadEvents(after_position=after_position, limit=limit, session_id=session_id),
            EventsPage,
        )
