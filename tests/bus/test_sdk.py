"""The module SDK against a running coordinator, on the in-process bus and on RabbitMQ:
hooks and retries, lifecycle callbacks, local reads, catch-up on start, exactly-once
in-order application whatever the broker delivers, dead-lettering of bad input, and a
graceful close that gives back what it had not applied."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import msgspec

from contracts import (
    HEADERS,
    REGISTRY_ID,
    Codec,
    ErrorCode,
    EventEnvelope,
    ModuleSessionConfig,
    SessionStatus,
    StandardError,
    WorkflowConfig,
    WorkflowSession,
    new_id,
)
from contracts.topology import QueueSpec
from coordinator.service.relay import event_message
from coordinator.service.runtime import CoordinatorRuntime
from module_sdk import CommandFailed, CoordinatorUnavailable
from module_sdk.testing import wait_for
from tests.bus.conftest import Bus
from tests.bus.support import (
    Inbox,
    RecordingModule,
    dead_letters,
    take,
    wait_destroyed,
    wait_status,
)
from transport.port import OutgoingMessage

S = SessionStatus


class Observer(RecordingModule):
    """A module that is not required and does not join: it only follows sessions."""

    module_id = "frontend-api"
    required = False

    def __init__(self, *args: object, **options: object) -> None:
        super().__init__(*args, join=False, **options)  # type: ignore[arg-type]


async def stored(runtime: CoordinatorRuntime) -> list[EventEnvelope]:
    store = runtime.coordinator.store
    assert store is not None
    return await asyncio.to_thread(store.read, 0, 100_000)


async def test_module_creates_and_links_then_destroys_and_unlinks(bus: Bus) -> None:
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule)
        async with module:
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            session = await wait_status(rt, sid, S.ACTIVE)
            msid, _ = module.created[sid]
            info = session.modules["executor"]
            assert (info.session_id, info.metadata) == (msid, {"made-by": "executor", "attempt": 1})
            assert session.executor_session_id == msid
            assert module.destroyed == []

            await client.destroy_workflow_session(sid)
            await wait_destroyed(rt, sid)
            assert [(d.session_id, d.linked_workflow_session_id) for d in module.destroyed] == [
                (msid, sid)
            ]
            history = (await client.get_session_history(sid)).events
            assert [e.type for e in history][-2:] == ["session.unlinked", "session.destroyed"]


async def test_on_create_failing_twice_then_succeeding_links_with_retry_attempts_2(
    bus: Bus,
) -> None:
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule, fail_creates=2, retry_attempts=2)
        async with module:
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            session = await wait_status(rt, sid, S.ACTIVE)
            assert module.attempts[sid] == 3
            assert session.modules["executor"].metadata["attempt"] == 3
            history = (await client.get_session_history(sid)).events
            assert "session.error-reported" not in [e.type for e in history]


async def test_retry_attempts_from_the_session_config_override_the_module_default(
    bus: Bus,
) -> None:
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule, fail_creates=1, retry_attempts=0)
        async with module:
            client = await bus.client()
            config = WorkflowConfig(
                module_configs={"executor": ModuleSessionConfig(retry_attempts=1)}
            )
            sid = (await client.create_workflow_session(["s"], config)).session_id
            await wait_status(rt, sid, S.ACTIVE)
            assert module.attempts[sid] == 2
            assert module.created[sid][1].retry_attempts == 1


async def test_on_create_failing_beyond_retry_attempts_reports_a_fatal_error_and_fails_session(
    bus: Bus,
) -> None:
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule, fail_creates=99, retry_attempts=1)
        async with module:
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            await wait_destroyed(rt, sid)
            assert module.attempts[sid] == 2
            history = (await client.get_session_history(sid)).events
            assert [e.type for e in history] == [
                "session.created",
                "session.error-reported",
                "session.status-changed",
                "session.status-changed",
                "session.destroyed",
            ]
            reported = history[1].event
            assert reported.module_id == "executor"  # type: ignore[union-attr]
            assert reported.error.code is ErrorCode.MODULE_ERROR  # type: ignore[union-attr]
            assert "after 2 attempts" in reported.error.message  # type: ignore[union-attr]
            assert "the browser did not start" in reported.error.message  # type: ignore[union-attr]
            failed = history[2].event
            assert (failed.old_status, failed.new_status) == (S.INITIALIZING, S.FAILED)  # type: ignore[union-attr]
            assert failed.error.code is ErrorCode.MODULE_ERROR  # type: ignore[union-attr]
            state = await client.get_workflow_session(sid)
            assert state is not None
            assert state.failure is not None
            assert module.created == {}
            health = await module.health_check()
            assert health.errors[-1].code is ErrorCode.MODULE_ERROR
            await wait_for(lambda: bool(module.events_of("destroyed", sid)), what="destroyed cb")
            assert module.events_of("error", sid) == [
                ("error", "executor", sid, ErrorCode.MODULE_ERROR)
            ]


class FlakyJoin(RecordingModule):
    """``should_join`` fails the first time it is asked about a session (a bug, or a
    transient fault in a module's own code)."""

    def __init__(self, *args: object, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self.asked: dict[uuid.UUID, int] = {}

    def should_join(self, session: WorkflowSession) -> bool:
        sid = session.session_id
        self.asked[sid] = self.asked.get(sid, 0) + 1
        if self.asked[sid] == 1:
            raise RuntimeError("module not ready yet")
        return True


async def test_an_event_whose_reaction_failed_is_applied_again_when_redelivered(
    bus: Bus,
) -> None:
    """The ack policy: a failure to apply requeues, and the redelivery applies the event
    (it is not skipped as a duplicate of what failed)."""
    async with bus.runtime() as rt:
        module = bus.module(FlakyJoin)
        async with module:
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            await wait_status(rt, sid, S.ACTIVE)
            stats = module.consumer.stats
            assert module.asked[sid] == 2
            assert stats.requeued == 1
            await wait_for(lambda: stats.versions.get(sid) == [1, 2, 3], what="v1..v3 applied")
            assert stats.duplicates == 0


async def test_links_and_unlinks_that_got_no_reply_are_retried_not_given_up(bus: Bus) -> None:
    """The coordinator stops answering commands while the module reacts to a new
    session, then again while it reacts to its clean-up: the reactions are not dropped
    (their events are requeued and tried again), and the retry finishes the link or the
    unlink without running ``on_create`` or ``on_destroy`` a second time."""
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule, client_timeout=0.2)
        async with module:
            stats = module.consumer.stats
            await rt.server.stop()  # commands are queued, nobody answers
            sid = (await rt.coordinator.create_workflow_session(["s"])).session_id
            await wait_for(lambda: stats.requeued >= 1, what="the create reaction requeued")
            await rt.server.start()
            await wait_status(rt, sid, S.ACTIVE, timeout=15)
            assert module.attempts[sid] == 1
            assert module.made == [module.created[sid][0]]

            requeued = stats.requeued
            await rt.server.stop()
            await rt.coordinator.destroy_workflow_session(sid)
            await wait_for(lambda: stats.requeued > requeued, what="the cleanup requeued")
            await rt.server.start()
            await wait_destroyed(rt, sid, timeout=15)
            assert [d.session_id for d in module.destroyed] == module.made
            final = (await rt.coordinator.get_session_history(sid)).events[-1].version
            await wait_for(
                lambda: stats.versions.get(sid) == list(range(1, final + 1)),
                what="every version applied once",
            )


async def test_a_link_whose_reply_was_lost_is_answered_as_applied_after_the_session_moved_on(
    bus: Bus,
) -> None:
    """The module's link is applied but its reply lost; by the time the redelivered
    event tries it again the session is being cleaned up. The try is the same command
    (one command id per link), so the coordinator answers it as it did the first — not
    refused as a link to a closed session — and the module session is destroyed once."""
    async with bus.runtime() as rt:
        refused: list[ErrorCode] = []
        lost: list[uuid.UUID] = []

        class LostReply(RecordingModule):
            def __init__(self, *args: Any, **options: Any) -> None:
                super().__init__(*args, **options)
                link = self.client.link_module_session

                async def first_reply_lost(*a: Any, **kw: Any) -> Any:
                    relay = rt.relay
                    assert relay is not None
                    if not lost:
                        # Nothing more reaches the module until the link is tried again.
                        relay.fence = lambda: False
                    try:
                        accepted = await link(*a, **kw)
                    except CommandFailed as exc:
                        refused.append(exc.code)
                        raise
                    finally:
                        if lost:
                            relay.fence = None
                            relay.wake()
                    if not lost:
                        lost.append(a[0])
                        await rt.coordinator.destroy_workflow_session(a[0])  # moves on
                        raise CoordinatorUnavailable("no reply (lost)")
                    return accepted

                self.client.link_module_session = first_reply_lost  # type: ignore[method-assign]

        module = bus.module(LostReply)
        async with module:
            sid = (await rt.coordinator.create_workflow_session(["s"])).session_id
            await wait_destroyed(rt, sid, timeout=15)
            assert lost == [sid]
            assert refused == []
            assert module.made == [module.created[sid][0]]
            assert [d.session_id for d in module.destroyed] == module.made


async def test_every_lifecycle_callback_fires(bus: Bus) -> None:
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule)
        async with module:
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            await wait_status(rt, sid, S.ACTIVE)
            await client.update_session_status(sid, S.PAUSED)
            await client.update_session_status(sid, S.ACTIVE)
            warning = StandardError(code=ErrorCode.MODULE_ERROR, message="page slow")
            await client.report_error(sid, warning, fatal=False)
            await client.destroy_workflow_session(sid)
            await wait_for(lambda: bool(module.events_of("destroyed", sid)), what="destroyed cb")

            msid = module.created[sid][0]
            assert module.events_of("created", sid) == [("created", "executor", sid, msid)]
            assert [e[3:] for e in module.events_of("status", sid)] == [
                (S.INITIALIZING, S.ACTIVE),
                (S.ACTIVE, S.PAUSED),
                (S.PAUSED, S.ACTIVE),
                (S.ACTIVE, S.CLEANUP),
            ]
            assert module.events_of("error", sid) == [
                ("error", "executor", sid, ErrorCode.MODULE_ERROR)
            ]
            assert module.events_of("destroyed", sid) == [("destroyed", "executor", sid)]
            kinds = [e[0] for e in module.events if e[2] == sid]
            assert kinds.index("created") < kinds.index("error") < kinds.index("destroyed")


async def test_reads_are_local_and_follow_the_events(bus: Bus) -> None:
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule)
        async with module:
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            await wait_for(lambda: module.session_exists(sid), what="the link applied locally")
            info = module.get_session(sid)
            assert info is not None
            assert info.session_id == module.created[sid][0]
            assert module.get_session_status(sid) is S.ACTIVE
            assert module.get_last_activity(sid) == info.last_activity
            await wait_for(
                lambda: module.sessions[sid].status is S.ACTIVE, what="the workflow ACTIVE locally"
            )

            await module.update_session_status(sid, S.PAUSED)
            await wait_for(lambda: module.get_session_status(sid) is S.PAUSED, what="PAUSED")
            assert rt.coordinator.projections.sessions[sid].modules["executor"].status is S.PAUSED
            seen = module.get_last_activity(sid)
            assert seen is not None
            await module.record_activity(sid)
            await wait_for(
                lambda: (module.get_last_activity(sid) or seen) > seen, what="new activity"
            )
            health = await module.health_check()
            assert (health.module_id, health.is_healthy) == ("executor", True)
            assert (health.active_sessions, health.total_sessions) == (1, 1)

            await client.destroy_workflow_session(sid)
            await wait_for(lambda: not module.session_exists(sid), what="destroyed locally")
            assert module.get_session(sid) is None
            assert module.get_session_status(sid) is None
            assert module.get_last_activity(sid) is None
            assert (await module.health_check()).active_sessions == 0


async def test_catch_up_on_start_links_waiting_sessions_and_finishes_missed_cleanups(
    bus: Bus,
) -> None:
    async with bus.runtime() as rt:
        client = await bus.client()
        await client.register_module("executor", required=True)
        waiting = (await client.create_workflow_session(["a"])).session_id
        cleaning = (await client.create_workflow_session(["b"])).session_id
        held = new_id()
        await client.link_module_session(cleaning, "executor", held)
        await client.destroy_workflow_session(cleaning)
        assert rt.coordinator.projections.sessions[waiting].status is S.INITIALIZING
        assert rt.coordinator.projections.sessions[cleaning].status is S.CLEANUP

        module = bus.module(RecordingModule)
        async with module:
            session = await wait_status(rt, waiting, S.ACTIVE)
            assert session.modules["executor"].session_id == module.created[waiting][0]
            await wait_destroyed(rt, cleaning)
            assert [d.session_id for d in module.destroyed] == [held]
            assert list(module.created) == [waiting]
            history = (await client.get_session_history(cleaning)).events
            assert [e.type for e in history][-2:] == ["session.unlinked", "session.destroyed"]


async def test_start_up_creates_only_for_sessions_that_still_wait_for_the_module(
    bus: Bus,
) -> None:
    """A session the start-up listing shows waiting for the module ends before the
    module gets to it: it gets no create and no link; one still waiting gets its create
    once."""
    async with bus.runtime() as rt:
        client = await bus.client()
        await client.register_module("executor", required=True)
        ended = (await client.create_workflow_session(["a"])).session_id
        waiting = (await client.create_workflow_session(["b"])).session_id

        class Behind(RecordingModule):
            async def _catch_up(self) -> None:
                await super()._catch_up()
                # The listing is behind from here on: one session it shows waiting ends.
                await client.update_session_status(ended, S.CANCELLED)
                await client.destroy_workflow_session(ended)
                await wait_destroyed(rt, ended)

        module = bus.module(Behind)
        async with module:
            await wait_status(rt, waiting, S.ACTIVE)
            assert list(module.created) == [waiting]
            assert ended not in module.attempts
            assert module.destroyed == []


async def test_a_restarted_module_folds_what_it_missed_and_reacts_once_to_the_present(
    bus: Bus,
) -> None:
    """A module away while one of its sessions is destroyed (it ends by the cleanup
    timeout) and another is created comes back to a queue holding the missed events,
    plus late copies of the destroyed session's whole history, shuffled: it creates
    once for the session waiting for it, and for the destroyed one it neither creates,
    nor links, nor destroys, nor reports it created; every version is applied once."""
    topo = bus.topology
    async with bus.runtime() as rt:
        client = await bus.client()
        injector = await bus.connect("injector")
        first = bus.module(RecordingModule)
        async with first:
            gone = (
                await client.create_workflow_session(["a"], WorkflowConfig(cleanup_timeout_ms=50))
            ).session_id
            await wait_status(rt, gone, S.ACTIVE)
        # Away: the held session is destroyed (its link orphaned), another one waits.
        await client.destroy_workflow_session(gone)
        await wait_destroyed(rt, gone)
        waiting = (await client.create_workflow_session(["b"])).session_id
        late = [
            event_message(e, Codec("json")) for e in (await client.get_session_history(gone)).events
        ]
        late += late[:3]
        random.Random(20261203).shuffle(late)
        for message in late:
            await injector.publish("", topo.module_queue("executor"), message)

        second = bus.module(RecordingModule)
        second.consumer.stats.record_versions = True
        async with second:
            await wait_status(rt, waiting, S.ACTIVE)
            final = (await client.get_session_history(gone)).events[-1].version
            stats = second.consumer.stats
            queue = topo.module_queue("executor")

            async def drained() -> bool:
                depth = await injector.queue_stats(queue)
                return depth is not None and depth.messages == 0 and not second.consumer._inflight

            await wait_for(
                lambda: len(stats.versions.get(gone, ())) == final,
                what="the destroyed session's events applied",
            )
            for _ in range(500):  # bounded: 10 s
                if await drained():
                    break
                await asyncio.sleep(0.02)
            assert await drained(), "the queue was not drained"
            assert list(second.created) == [waiting]
            assert second.destroyed == []
            assert second.events_of("created", gone) == []
            assert second.events_of("status", gone) == []
            assert second.consumer.stats.versions.get(gone) == list(range(1, final + 1))
            assert second.consumer.stats.dead_lettered == second.consumer.stats.requeued == 0
            assert gone not in second.sessions


async def test_duplicated_and_shuffled_deliveries_are_applied_once_in_version_order(
    bus: Bus,
) -> None:
    """Copies of real event messages, shuffled, a quarter of them twice and some not at
    all, straight into a module's queue: each session's events are applied exactly once
    each, in version order, the missing ones fetched from the coordinator."""
    topo = bus.topology
    async with bus.runtime() as rt:
        client = await bus.client()
        injector = await bus.connect("injector")
        tap = f"{bus.prefix}.tap"
        await injector.declare_queue(QueueSpec(tap, bindings=[(topo.events_exchange, "session.#")]))
        sids = []
        for i in range(12):
            sid = (await client.create_workflow_session([f"s{i}"])).session_id
            for _ in range(i % 3 + 1):
                await client.record_activity(sid)
            await client.update_session_status(sid, S.PAUSED)
            await client.update_session_status(sid, S.ACTIVE)
            await client.update_session_status(sid, S.COMPLETED)
            await client.destroy_workflow_session(sid)
            sids.append(sid)
        await rt.wait_published()
        events = [e for e in await stored(rt) if e.session_id != REGISTRY_ID]
        final = {sid: max(e.version for e in events if e.session_id == sid) for sid in sids}
        real = [d.to_outgoing() for d in await take(injector, tap, len(events))]

        rng = random.Random(20261126)
        last = set(final.items())
        droppable = [
            m
            for m in real
            if (uuid.UUID(str(m.headers[HEADERS.SESSION_ID])), m.headers[HEADERS.VERSION])
            not in last
        ]
        dropped = rng.sample(droppable, k=len(real) // 10)
        kept = [m for m in real if m not in dropped]
        copies = kept + rng.sample(kept, k=len(kept) // 4)
        rng.shuffle(copies)
        assert len(copies) - len(kept) >= len(copies) // 10

        module = bus.module(Observer)
        async with module:
            stats = module.consumer.stats
            queue = topo.module_queue(module.module_id)
            for copy in copies:
                await injector.publish("", queue, copy)
            await wait_for(
                lambda: (
                    stats.received == len(copies)
                    and all(len(stats.versions.get(s, ())) == final[s] for s in sids)
                ),
                timeout=30,
                what="every copy received and every session applied",
            )
            await wait_for(
                lambda: stats.applied == len(events) and not module.consumer._inflight,
                what="the consumer idle",
            )
            for sid in sids:
                assert stats.versions[sid] == list(range(1, final[sid] + 1))
                assert sid not in module.sessions  # destroyed, remembered as such
            assert stats.applied == len(events)
            assert stats.gaps_filled >= len(dropped)
            assert stats.duplicates == len(copies) - (len(events) - stats.gaps_filled)
            assert stats.dead_lettered == stats.requeued == 0


async def test_bad_bodies_are_dead_lettered_with_reasons_and_the_consumer_keeps_going(
    bus: Bus,
) -> None:
    topo = bus.topology
    async with bus.runtime() as rt:
        module = bus.module(RecordingModule)
        async with module:
            injector = await bus.connect("injector")
            queue = topo.module_queue("executor")
            bad = {
                "garbage": (b"\x00\xff not json at all", "application/json"),
                "wrong-schema": (
                    msgspec.json.encode({"event_id": str(new_id()), "version": 0}),
                    "application/json",
                ),
                "huge": (b"[" + b" " * (1 << 20) + b"]", "application/json"),
                "unknown-type": (b"<event/>", "application/xml"),
                "msgpack-garbage": (b"\xc1\xc1\xc1", "application/msgpack"),
            }
            for name, (body, content_type) in bad.items():
                await injector.publish(
                    "",
                    queue,
                    OutgoingMessage(body=body, content_type=content_type, message_id=name),
                )
            dead = {d.message_id: d for d in await dead_letters(injector, topo, 5)}
            assert set(dead) == set(bad)
            for name, letter in dead.items():
                headers = letter.headers
                expected = "MESSAGE_TOO_LARGE" if name == "huge" else "INVALID_MESSAGE"
                assert headers[HEADERS.REJECT_CODE] == expected, name
                assert headers[HEADERS.REJECTED_BY] == "executor"
                assert headers[HEADERS.REJECT_REASON], name
                assert headers["x-original-routing-key"] == queue
                assert letter.body == bad[name][0]
            assert str(dead["wrong-schema"].headers[HEADERS.REJECT_FIELD]).startswith("$.")
            assert dead["unknown-type"].headers[HEADERS.REJECT_FIELD] == "content_type"
            assert "over the limit" in str(dead["huge"].headers[HEADERS.REJECT_REASON])
            assert module.consumer.stats.dead_lettered == 5

            # Still consuming: a new session is linked as usual.
            client = await bus.client()
            sid = (await client.create_workflow_session(["s"])).session_id
            await wait_status(rt, sid, S.ACTIVE)
            stats = await injector.queue_stats(queue)
            assert stats is not None
            assert stats.consumers == 1


async def test_graceful_close_returns_what_was_prefetched_but_not_applied(bus: Bus) -> None:
    topo = bus.topology
    async with bus.runtime() as rt:
        client = await bus.client()
        module = bus.module(Observer, prefetch=64)
        await module.start()
        try:
            held = new_id()
            module.hold.add(held)  # its first status change blocks in the callback
            await client.create_workflow_session(["held"], session_id=held)
            for _ in range(3):
                await client.record_activity(held)  # these wait behind it, prefetched
            others = [(await client.create_workflow_session(["o"])).session_id for _ in range(2)]
            stats = module.consumer.stats
            await wait_for(
                lambda: stats.received == 9 and stats.applied == 5,
                what="held v2..v5 prefetched, everything else applied",
            )
            injector = await bus.connect("injector")
            queue = topo.module_queue(module.module_id)
            assert await injector.queue_stats(queue) is not None
        finally:
            await module.close(grace=0.2)

        assert stats.versions[held] == [1]
        # v2 did not finish applying: the local state does not claim it either.
        assert module.sessions[held].version == 1
        assert all(stats.versions[o] == [1, 2] for o in others)
        # A module queue is read by consuming (basic.get is refused on it).
        returned = Inbox()
        await injector.consume(queue, returned)
        await returned.wait(4)
        history = [e for e in await stored(rt) if e.session_id == held]
        assert sorted(d.message_id or "" for d in returned.deliveries) == sorted(
            str(e.event_id) for e in history if e.version > 1
        )
        assert all(d.redelivered for d in returned.deliveries)
        assert len(returned.deliveries) == 4
