"""Read models, built only from the notification log.

``Projections`` folds every envelope after its tracked position into: sessions by id,
by status and by module; the module registry; orphaned module sessions; and the
command ids already applied (so a retried command is answered, not re-applied, even
after a restart). It is owned by one thread at a time: built in a worker thread at
start-up, then updated only on the event loop.

Sessions are held compactly (``SessionTable``): the most recently folded ones as
``WorkflowSession`` objects, every other one packed by ``coordinator.domain.compact`` (about a
tenth of the memory) and unpacked when read.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Final, TypeAlias

import msgspec

from contracts import (
    ACTIVE_STATUSES,
    REGISTRY_ID,
    TERMINAL_STATUSES,
    Accepted,
    Heartbeat,
    Linked,
    ListWorkflowSessions,
    ModuleInfo,
    ModuleRegistered,
    ModuleSessionInfo,
    ModuleUnregistered,
    OrphanCleanupRequested,
    OrphanReported,
    SessionEvent,
    SessionIntegrityReport,
    SessionsCursor,
    SessionsPage,
    SessionStatus,
    StandardError,
    WorkflowSession,
    fold_session,
)
from coordinator.domain import compact
from coordinator.domain.aggregates import next_deadline
from coordinator.domain.compact import created_key, deadline_of, micros, pack, unpack

__all__ = ["ProjectionSnapshot", "Projections", "SessionTable", "integrity_report"]

log = logging.getLogger("sessionbus.coordinator.projections")

_S = SessionStatus
_REGISTRY: Final = REGISTRY_ID.int
# The low 128 bits of an order key (SessionTable.by_created): the session's UUID.int.
_ID_BITS: Final = (1 << 128) - 1
# A filter matching fewer than one session in this many of those in range is read from
# its own set rather than by walking the creation-order index (see ``sessions_page``).
SPARSE_FILTER: Final = 16
# A module is healthy while its last heartbeat is younger than this many intervals.
HEALTHY_INTERVALS: Final = 3
# How many applied command ids are remembered for idempotent retries (at least; up
# to _COMMAND_SLACK more between evictions).
COMMAND_MEMORY: Final = 100_000
_COMMAND_SLACK: Final = 1_000
# How many destroyed sessions keep their final state in memory for reads.
DESTROYED_MEMORY: Final = 10_000
# How many of the most recently folded sessions stay unpacked, at least (the rest are
# packed; see SessionTable): while serving, during a replay (begin_replay), and of the
# destroyed sessions remembered.
HOT_SESSIONS: Final = 512
BULK_HOT_SESSIONS: Final = 1024
DESTROYED_HOT: Final = 64


class ProjectionSnapshot(msgspec.Struct, kw_only=True):
    """The persisted form of the read models, with the position they reflect."""

    position: int
    sessions: list[WorkflowSession]
    destroyed: int  # how many sessions were destroyed
    modules: dict[str, ModuleRegistered]
    orphans: dict[uuid.UUID, dict[str, uuid.UUID]]
    commands: list[tuple[uuid.UUID, Accepted]]


SessionListener = Callable[[SessionEvent, WorkflowSession], None]

# A packed session: its id object (the one every index shares) and its packed state.
_Packed: TypeAlias = tuple[uuid.UUID, bytes]


class SessionTable(Mapping[uuid.UUID, WorkflowSession]):
    """Sessions by id, in insertion order: the most recently stored ones as objects,
    the others packed (``coordinator.domain.compact``) and unpacked on every read, so a read
    never hands out an object the table holds on to. A state that cannot be packed
    exactly stays an object.

    "Most recently" is by generations of ``hot`` distinct sessions: a state is packed
    when a whole generation has gone by without it being stored again, so between
    ``hot`` and twice as many stay unpacked (cheaper per store than an exact LRU).

    Entries are keyed by ``UUID.int`` (hashed in C; ``UUID.__hash__`` is Python code
    and a replay looks sessions up several times per event); the id object itself is
    the packed entry's first item or the state's ``session_id``."""

    def __init__(self, hot: int = HOT_SESSIONS, *, ordered: bool = False) -> None:
        self._data: dict[int, WorkflowSession | _Packed] = {}
        self._young: dict[int, None] = {}  # stored during this generation
        self._old: dict[int, None] = {}  # stored during the previous one
        self.hot = hot
        # Keys in the order they were first stored, for ``popitem`` (an ``ordered``
        # table: the destroyed sessions a projection remembers).
        self._order: deque[int] | None = deque() if ordered else None
        # The sessions in creation order (``by_created``), built on the first ask and
        # then kept up by the changes since: ``_added`` and ``_removed`` (order keys).
        self._index: list[int] | None = None
        self._added: list[int] = []
        self._removed: set[int] = set()

    def __getitem__(self, session_id: uuid.UUID) -> WorkflowSession:
        return self._state(self._data[session_id.int])

    def get(self, session_id: uuid.UUID, default: None = None) -> WorkflowSession | None:  # type: ignore[override]
        value = self._data.get(session_id.int)
        return None if value is None else self._state(value)

    @staticmethod
    def _state(value: WorkflowSession | _Packed) -> WorkflowSession:
        if isinstance(value, tuple):
            return unpack(value[0], value[1])
        return value

    @staticmethod
    def _id(value: WorkflowSession | _Packed) -> uuid.UUID:
        return value[0] if isinstance(value, tuple) else value.session_id

    def __contains__(self, session_id: object) -> bool:
        return isinstance(session_id, uuid.UUID) and session_id.int in self._data

    def __iter__(self) -> Iterator[uuid.UUID]:
        return map(self._id, self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        unpacked = len(self._young.keys() | self._old.keys())
        return f"SessionTable({len(self._data)} sessions, {unpacked} unpacked)"

    def entry(self, session_id: uuid.UUID) -> tuple[uuid.UUID, WorkflowSession] | None:
        """The id object the table holds for ``session_id`` (every index shares it)
        and the state, or ``None``."""
        value = self._data.get(session_id.int)
        if value is None:
            return None
        if isinstance(value, tuple):
            return value[0], unpack(value[0], value[1])
        return value.session_id, value

    def put(self, state: WorkflowSession) -> None:
        """Store ``state`` under its ``session_id``, unpacked until ``hot`` more recent
        states push it out."""
        key = state.session_id.int
        data = self._data
        if key not in data:
            if self._order is not None:
                self._order.append(key)
            if self._index is not None:
                self._note_added((micros(state.created_at) << 128) + key)
        data[key] = state
        young = self._young
        young[key] = None
        if len(young) >= self.hot:
            # A generation has gone by: pack what the previous one stored and this
            # one did not store again.
            for old in self._old:
                if old not in young:
                    self._pack(old)
            self._old, self._young = young, {}

    def entries(self) -> Iterator[tuple[uuid.UUID, WorkflowSession | bytes]]:
        """Every entry as stored, in order: (id object, state or packed state)."""
        for value in self._data.values():
            if isinstance(value, tuple):
                yield value
            else:
                yield value.session_id, value

    def adopt(self, session_id: uuid.UUID, value: WorkflowSession | bytes) -> None:
        """Append an entry as ``entries`` gives it (``session_id`` becomes the entry's
        id object), not counted as recently stored: for merging tables."""
        key = session_id.int
        if key not in self._data:
            if self._order is not None:
                self._order.append(key)
            if self._index is not None:
                created = (
                    created_key(value) if isinstance(value, bytes) else micros(value.created_at)
                )
                self._note_added((created << 128) + key)
        if isinstance(value, bytes):
            self._data[key] = (session_id, value)
        else:
            if value.session_id is not session_id:
                value = msgspec.structs.replace(value, session_id=session_id)
            self._data[key] = value

    def clear(self) -> None:
        self._data.clear()
        self._young, self._old = {}, {}
        self._drop_index()
        if self._order is not None:
            self._order.clear()

    def pop(self, session_id: uuid.UUID) -> None:
        key = session_id.int
        if self._index is not None and key in self._data:
            self._removed.add((self.created(session_id) << 128) + key)
            if len(self._removed) > len(self._data):
                self._drop_index()
        self._data.pop(key, None)
        self._young.pop(key, None)
        self._old.pop(key, None)

    def popitem(self) -> None:
        """Forget the entry first stored longest ago (an ``ordered`` table)."""
        assert self._order is not None
        while self._order:
            key = self._order.popleft()
            if self._data.pop(key, None) is not None:
                self._young.pop(key, None)
                self._old.pop(key, None)
                self._drop_index()
                return

    def compact(self) -> None:
        """Pack every unpacked state."""
        for generation in (self._old, self._young):
            for key in generation:
                self._pack(key)
        self._old, self._young = {}, {}

    def _pack(self, key: int) -> None:
        state = self._data.get(key)
        if state is None or isinstance(state, tuple):
            return
        blob = pack(state, next_deadline(state))
        if blob is not None:
            self._data[key] = (state.session_id, blob)

    def created(self, session_id: uuid.UUID) -> int:
        """``created_at`` of a session as microseconds since the epoch (orders as the
        datetimes do), without unpacking it."""
        value = self._data[session_id.int]
        if isinstance(value, tuple):
            return created_key(value[1])
        return micros(value.created_at)

    def _note_added(self, order_key: int) -> None:
        self._added.append(order_key)
        if len(self._added) > len(self._data):
            self._drop_index()  # nobody asked for a long while: rebuild when asked

    def _drop_index(self) -> None:
        self._index, self._added, self._removed = None, [], set()

    def by_created(self) -> list[int]:
        """Every session's order key, ``created_us << 128 | UUID.int``, ascending: the
        order of (creation time, id), as integers (compared in C). Built once, then
        brought up to date with the sessions stored and popped since the last ask, so
        a page of a large table costs the changes, not a sort of every session."""
        index = self._index
        if index is None:
            index = sorted(
                ((created_key(v[1]) if isinstance(v, tuple) else micros(v.created_at)) << 128) + k
                for k, v in self._data.items()
            )
        else:
            if self._removed:
                removed = self._removed
                if len(removed) < 64:
                    for order_key in removed:
                        at = bisect.bisect_left(index, order_key)
                        if at < len(index) and index[at] == order_key:
                            del index[at]
                else:
                    index = [k for k in index if k not in removed]
            if self._added:
                added = sorted(self._added)
                if not index or added[0] > index[-1]:
                    index.extend(added)  # the usual case: newer than every key held
                elif len(added) < 64:
                    for order_key in added:
                        bisect.insort(index, order_key)
                else:
                    index.extend(added)
                    index.sort()
        self._index, self._added, self._removed = index, [], set()
        return index

    def id_of(self, key: int) -> uuid.UUID:
        """The id object of the session stored under ``UUID.int`` ``key``."""
        return self._id(self._data[key])

    def state_of(self, key: int) -> WorkflowSession:
        return self._state(self._data[key])

    def find(self, wanted: uuid.UUID) -> set[uuid.UUID]:
        """The id objects of the sessions whose id is ``wanted`` or that have a module
        session with that id linked. A packed state holds its UUIDs as their 16 bytes,
        so a byte search picks the candidates without unpacking every state."""
        found: set[uuid.UUID] = set()
        value = self._data.get(wanted.int)
        if value is not None:
            found.add(self._id(value))
        needle = wanted.bytes
        for value in self._data.values():
            if isinstance(value, tuple):
                if needle not in value[1]:
                    continue
                state = unpack(value[0], value[1])
            else:
                state = value
            if any(info.session_id == wanted for info in state.modules.values()):
                found.add(state.session_id)
        return found

    def deadlines(self) -> Iterator[tuple[datetime, uuid.UUID]]:
        """``(next_deadline(state), id)`` of every session that has one."""
        for value in self._data.values():
            if isinstance(value, tuple):
                sid, deadline = value[0], deadline_of(value[1])
            else:
                sid, deadline = value.session_id, next_deadline(value)
            if deadline is not None:
                yield deadline, sid


class Projections:
    """Every read the seed's SessionCoordinator needs, as in-memory indexes."""

    def __init__(
        self, *, command_memory: int = COMMAND_MEMORY, destroyed_memory: int = DESTROYED_MEMORY
    ) -> None:
        self.command_memory = command_memory
        self.destroyed_memory = destroyed_memory
        self.position = 0
        self.sessions = SessionTable()
        self.by_status: dict[SessionStatus, set[uuid.UUID]] = {s: set() for s in SessionStatus}
        self.by_module: dict[str, set[uuid.UUID]] = {}
        # Destroyed sessions are counted, not listed (their ids would grow without
        # bound); the newest keep their final state, older ones are read from the store.
        self.destroyed = 0
        self.recently_destroyed = SessionTable(hot=DESTROYED_HOT, ordered=True)
        self.modules: dict[str, ModuleRegistered] = {}
        self.heartbeats: dict[str, tuple[Heartbeat, datetime]] = {}
        # Each module's instances by id: the last heartbeat of each and when it came.
        self.instances: dict[str, dict[uuid.UUID, tuple[Heartbeat, datetime]]] = {}
        self.orphans: dict[uuid.UUID, dict[str, uuid.UUID]] = {}
        # By ``UUID.int`` (hashed in C; see SessionTable), oldest first (a plain dict: an
        # OrderedDict costs twice the memory per entry). ``applied_commands`` has the ids.
        self.commands: dict[int, Accepted] = {}
        self.listeners: list[SessionListener] = []
        self.events_applied = 0
        # (module session id, workflow session id) of each Linked event folded, while
        # a list is set here: the coordinator's module-session lookup takes them
        # (a destroyed session's state holds no links, so this is where they are seen).
        self.new_links: list[tuple[uuid.UUID, uuid.UUID]] | None = None
        # Kept between track_positions() and untrack() (a partitioned rebuild's merge
        # orders by them): the position of each remembered command's first event, by
        # the order the commands were first seen (the memory holds the last ones), and
        # of each session's Destroyed.
        self._command_first: array[int] | None = None
        self._commands_dropped = 0
        self._destroyed_at: dict[int, int] | None = None

    # -- folding ----------------------------------------------------------------------

    def apply(self, env: SessionEvent) -> None:
        """Fold one envelope. Envelopes at or before the tracked position are skipped,
        so a replay overlapping what is already applied is harmless."""
        position = env.position or 0
        if position and position <= self.position:
            return
        session_id: uuid.UUID | None = None
        if env.session_id.int == _REGISTRY:
            self._apply_registry(env)
        else:
            session_id = self._apply_session(env)
        if env.causation_id is not None:
            self._remember(env, session_id)
        if position:
            self.position = position
        self.events_applied += 1

    def apply_all(self, envelopes: Iterable[SessionEvent]) -> None:
        for env in envelopes:
            self.apply(env)

    def begin_replay(self) -> None:
        """Until ``end_replay``: a long history is folded at once, so more states stay
        unpacked (fewer unpack/pack round trips). Destroyed sessions are packed only
        if still remembered at the end."""
        self.sessions.hot = BULK_HOT_SESSIONS
        self.recently_destroyed.hot = self.destroyed_memory

    def end_replay(self) -> None:
        """Back to serving: every state packed, the most recent ones unpacked as they
        are folded again."""
        self.sessions.hot = HOT_SESSIONS
        self.recently_destroyed.hot = DESTROYED_HOT
        self.sessions.compact()
        self.recently_destroyed.compact()

    def _apply_session(self, env: SessionEvent) -> uuid.UUID:
        """Fold a session event into the indexes; returns the session's id object.

        Every index holds the one id object of the session's first event, not the copy
        each decoded envelope brings (a UUID object is ~100 bytes), and an index is only
        touched when what it indexes changed: a replay spends most of its time here."""
        entry = self.sessions.entry(env.session_id)
        if entry is None:
            old = None
            sid = env.session_id
            if sid in self.recently_destroyed:
                return sid  # nothing follows Destroyed; a replayed duplicate is ignored
            old_modules: dict[str, ModuleSessionInfo] = {}
        else:
            sid, old = entry
            old_modules = old.modules
        new = fold_session(old, env)
        if self.new_links is not None and isinstance(env.event, Linked):
            self.new_links.append((env.event.module_session_id, sid))
        status_changed = old is None or new.status is not old.status
        if old is not None and (status_changed or new.destroyed):
            self.by_status[old.status].discard(sid)
        if new.modules is not old_modules and new.modules.keys() != old_modules.keys():
            for module_id in old_modules.keys() - new.modules.keys():
                self._unindex_module(module_id, sid)
            for module_id in new.modules.keys() - old_modules.keys():
                self.by_module.setdefault(module_id, set()).add(sid)
        if new.session_id is not sid:
            # The fold keeps the id object of the state it folded: the table's own.
            new = msgspec.structs.replace(new, session_id=sid)
        if new.destroyed:
            if self._destroyed_at is not None:
                self._destroyed_at.setdefault(sid.int, env.position or 0)
            self.sessions.pop(sid)
            self.destroyed += 1
            self.recently_destroyed.put(new)
            if len(self.recently_destroyed) > self.destroyed_memory:
                self.recently_destroyed.popitem()
        else:
            self.sessions.put(new)
            if status_changed:
                self.by_status[new.status].add(sid)
        for listener in self.listeners:
            listener(env, new)
        return sid

    def _unindex_module(self, module_id: str, sid: uuid.UUID) -> None:
        members = self.by_module.get(module_id)
        if members is not None:
            members.discard(sid)
            if not members:
                del self.by_module[module_id]

    def _apply_registry(self, env: SessionEvent) -> None:
        event = env.event
        if isinstance(event, ModuleRegistered):
            self.modules[event.module_id] = event
        elif isinstance(event, ModuleUnregistered):
            self.modules.pop(event.module_id, None)
        elif isinstance(event, OrphanReported):
            self.orphans.setdefault(event.workflow_session_id, {})[event.module_id] = (
                event.module_session_id
            )
        elif isinstance(event, OrphanCleanupRequested):
            held = self.orphans.get(event.workflow_session_id)
            if held is not None and held.get(event.module_id) == event.module_session_id:
                del held[event.module_id]
                if not held:
                    del self.orphans[event.workflow_session_id]

    def _remember(self, env: SessionEvent, session_id: uuid.UUID | None) -> None:
        """Record the command behind ``env``; ``session_id`` is the session's shared id
        object, ``None`` for a registry event."""
        assert env.causation_id is not None
        commands = self.commands
        # Kept where it was first remembered: a command's events are committed together,
        # so first remembered is (to within one commit) last remembered, without moving.
        key = env.causation_id.int
        previous = commands.get(key)
        version = env.version
        if previous is None:
            count = 1
            if self._command_first is not None:
                self._command_first.append(env.position or 0)
        else:
            count = previous.events + 1
            if previous.session_id is not None and session_id is None:
                session_id, version = previous.session_id, previous.version
        commands[key] = Accepted(session_id=session_id, version=version, events=count)
        if len(commands) > self.command_memory + _COMMAND_SLACK:
            # The oldest go in batches: a dict finds its first entry by stepping over
            # the ones deleted before it (until it next resizes), so one at a time
            # would cost a scan per command.
            dropped = list(itertools.islice(commands, len(commands) - self.command_memory))
            for oldest in dropped:
                del commands[oldest]
            self._commands_dropped += len(dropped)

    def track_positions(self) -> None:
        """Keep the positions ``commands_at`` and ``recently_destroyed_at`` give, from
        an empty start (see ``__init__``)."""
        assert self.position == 0, "tracking starts empty"
        self._command_first = array("q")
        self._commands_dropped = 0
        self._destroyed_at = {}

    def untrack(self) -> None:
        self._command_first = self._destroyed_at = None

    def applied_commands(self) -> list[tuple[uuid.UUID, Accepted]]:
        """(command id, outcome) of every remembered command, oldest first."""
        return list(zip(uuids(self.commands), self.commands.values(), strict=True))

    def commands_at(self) -> list[tuple[int, int, Accepted]]:
        """(first position, command id's ``int``, outcome) of every remembered command,
        oldest first; needs ``track_positions``."""
        first = self._command_first
        assert first is not None, "positions not tracked"
        base = self._commands_dropped
        return [(first[base + i], cid, a) for i, (cid, a) in enumerate(self.commands.items())]

    def recently_destroyed_at(self) -> list[tuple[int, uuid.UUID, WorkflowSession | bytes]]:
        """(position of Destroyed, id, state as stored) of the destroyed sessions kept
        for reads, oldest first; needs ``track_positions``."""
        at = self._destroyed_at
        assert at is not None, "positions not tracked"
        return [(at[sid.int], sid, value) for sid, value in self.recently_destroyed.entries()]

    def commands_kept(self, distinct: int) -> int:
        """How many of ``distinct`` commands remembered one after another ``_remember``
        keeps: all up to the memory and its slack, then it drops to the memory in
        batches."""
        memory, slack = self.command_memory, _COMMAND_SLACK
        if distinct <= memory + slack:
            return distinct
        return memory + (distinct - memory) % (slack + 1)

    # -- heartbeats (not event-sourced) -----------------------------------------------

    def record_heartbeat(self, heartbeat: Heartbeat, received_at: datetime) -> None:
        self.heartbeats[heartbeat.module_id] = (heartbeat, received_at)
        instances = self.instances.setdefault(heartbeat.module_id, {})
        instances[heartbeat.instance_id] = (heartbeat, received_at)
        # Instances silent for long are forgotten (a restart is a new instance id).
        for instance_id, (seen, at) in list(instances.items()):
            if received_at - at > timedelta(milliseconds=seen.interval_ms * 100):
                del instances[instance_id]

    def is_healthy(self, module_id: str, now: datetime) -> bool:
        seen = self.heartbeats.get(module_id)
        if seen is None:
            return False
        heartbeat, received_at = seen
        window = timedelta(milliseconds=heartbeat.interval_ms * HEALTHY_INTERVALS)
        return heartbeat.health.is_healthy and now - received_at <= window

    # -- queries ----------------------------------------------------------------------

    def get(self, session_id: uuid.UUID) -> WorkflowSession | None:
        session = self.sessions.get(session_id)
        return session if session is not None else self.recently_destroyed.get(session_id)

    def deadlines(self) -> list[tuple[datetime, uuid.UUID]]:
        """The next timeout deadline of every live session that has one."""
        return list(self.sessions.deadlines())

    def active_session_ids(
        self, status: SessionStatus | None = None, module_id: str | None = None
    ) -> list[uuid.UUID]:
        if status is not None:
            ids: set[uuid.UUID] = set(self.by_status[status])
        else:
            ids = set().union(*(self.by_status[s] for s in ACTIVE_STATUSES))
        if module_id is not None:
            ids &= self.by_module.get(module_id, set())
        created = self.sessions.created
        # Ties (one clock tick) by id: the sets' own order depends on how they were built.
        return sorted(ids, key=lambda sid: (created(sid), sid))

    def sessions_page(
        self,
        status: SessionStatus | None,
        module_id: str | None,
        offset: int,
        limit: int,
        after: SessionsCursor | None = None,
        *,
        query: ListWorkflowSessions | None = None,
    ) -> SessionsPage:
        """Sessions not destroyed, oldest first (newest first with the query's
        ``newest_first``), optionally filtered: those ordered after ``after`` when it
        is given (keyset), else from ``offset``. ``query`` carries the operators'
        filters (``ListWorkflowSessions``).

        The walk follows the table's creation-order index from the cursor (or the
        creation-time bounds) and stops once the page and one more session are found:
        an unfiltered page of 100k sessions costs its own sessions, a filtered one the
        sessions walked past; a filter few sessions match is read from its own set
        instead (sorted by creation order), so no page costs a pass over every session."""
        q = query or ListWorkflowSessions()
        table = self.sessions
        # The id filters: sets of id objects, tested per session walked past.
        filters: list[set[uuid.UUID]] = []
        if q.match_id is not None:
            filters.append(table.find(q.match_id))
        if status is not None:
            filters.append(self.by_status[status])
        if module_id is not None:
            filters.append(self.by_module.get(module_id, set()))
        if after is not None:
            offset = 0
        order_keys = self._order_keys(q, after, filters)
        state_filters = q.has_errors or q.idle_since is not None
        picked: list[tuple[int, WorkflowSession]] = []
        skipped = 0
        for order_key in order_keys:
            key = order_key & _ID_BITS
            if filters:
                sid = table.id_of(key)
                if not all(sid in ids for ids in filters):
                    continue
            state = table.state_of(key) if state_filters or skipped >= offset else None
            if state_filters:
                assert state is not None
                if q.has_errors and state.failure is None:
                    continue
                if q.idle_since is not None and state.last_activity > q.idle_since:
                    continue
            if skipped < offset:
                skipped += 1
                continue
            assert state is not None
            picked.append((order_key, state))
            if len(picked) > limit:
                break
        more = len(picked) > limit
        page = picked[:limit]
        last = page[-1][0] if page else None
        return SessionsPage(
            sessions=[state for _, state in page],
            next_offset=offset + limit if more and after is None else None,
            next_after=SessionsCursor(created_us=last >> 128, session_id=page[-1][1].session_id)
            if more and last is not None
            else None,
            position=self.position,
        )

    def _order_keys(
        self,
        q: ListWorkflowSessions,
        after: SessionsCursor | None,
        filters: list[set[uuid.UUID]],
    ) -> Iterable[int]:
        """The order keys a page walks, in its order: the creation-order index between
        the query's time bounds and after its cursor, or, when ``filters`` match few
        sessions (a rare status, a module few sessions use, one id), their own order
        keys, sorted: cheaper than walking the index past all the rest."""
        table = self.sessions
        index = table.by_created()
        low, high = 0, len(index)
        if q.created_from is not None:
            low = bisect.bisect_left(index, micros(q.created_from) << 128)
        if q.created_to is not None:
            high = bisect.bisect_left(index, micros(q.created_to) << 128, low)
        if after is not None:
            cursor = (after.created_us << 128) + after.session_id.int
            if q.newest_first:
                high = max(low, min(high, bisect.bisect_left(index, cursor, low, high)))
            else:
                low = min(high, max(low, bisect.bisect_right(index, cursor, low, high)))
        fewest = min(filters, key=len) if filters else None
        if fewest is not None and len(fewest) * SPARSE_FILTER < high - low:
            first = index[low] if low < high else 0
            last = index[high - 1] if low < high else -1
            keys = sorted(
                k
                for k in ((table.created(sid) << 128) + sid.int for sid in fewest if sid in table)
                if first <= k <= last
            )
            return reversed(keys) if q.newest_first else keys
        positions = range(high - 1, low - 1, -1) if q.newest_first else range(low, high)
        return map(index.__getitem__, positions)

    def linked_sessions(self, session_id: uuid.UUID) -> dict[str, uuid.UUID]:
        session = self.sessions.get(session_id)
        if session is None:
            return {}
        return {m: info.session_id for m, info in session.modules.items()}

    def module_infos(self, now: datetime) -> list[ModuleInfo]:
        out = []
        for module_id, reg in sorted(self.modules.items()):
            seen = self.heartbeats.get(module_id)
            out.append(
                ModuleInfo(
                    module_id=module_id,
                    required=reg.required,
                    capabilities=list(reg.capabilities),
                    healthy=self.is_healthy(module_id, now),
                    last_heartbeat=seen[1] if seen else None,
                    active_sessions=len(self.by_module.get(module_id, ())),
                    instances=self._fresh_instances(module_id, now),
                    last_error=self._last_error(module_id),
                )
            )
        return out

    def _fresh_instances(self, module_id: str, now: datetime) -> int:
        return sum(
            1
            for heartbeat, at in self.instances.get(module_id, {}).values()
            if now - at <= timedelta(milliseconds=heartbeat.interval_ms * HEALTHY_INTERVALS)
        )

    def _last_error(self, module_id: str) -> StandardError | None:
        """The newest error any instance's heartbeat reported (its health's last)."""
        reported = [
            (at, heartbeat.health.errors[-1])
            for heartbeat, at in self.instances.get(module_id, {}).values()
            if heartbeat.health.errors
        ]
        return max(reported, key=lambda item: item[0])[1] if reported else None

    def status_counts(self) -> dict[SessionStatus, int]:
        return {status: len(ids) for status, ids in self.by_status.items()}

    def integrity(self, session_id: uuid.UUID) -> SessionIntegrityReport:
        session = self.get(session_id)
        orphans = dict(self.orphans.get(session_id, {}))
        return integrity_report(session_id, session, orphans, set(self.modules))

    # -- persistence ------------------------------------------------------------------

    def snapshot(self) -> ProjectionSnapshot:
        return ProjectionSnapshot(
            position=self.position,
            sessions=list(self.sessions.values()),
            destroyed=self.destroyed,
            modules=dict(self.modules),
            orphans={k: dict(v) for k, v in self.orphans.items()},
            commands=self.applied_commands(),
        )

    def encode_snapshot(self) -> bytes:
        """The read models as a checkpoint: every state as the table holds it (packed
        ones are not unpacked, so writing one costs little memory and time), with the
        module-name table the packed ones use."""
        sessions = list(self.sessions.entries())
        return _checkpoint_encoder.encode(
            _Checkpoint(
                format=CHECKPOINT_FORMAT,
                packing=compact.FORMAT,
                position=self.position,
                # Taken after the states: the table only grows, so it numbers them all.
                names=compact.names(),
                sessions=sessions,
                by_status={s: list(ids) for s, ids in self.by_status.items() if ids},
                by_module={m: list(ids) for m, ids in self.by_module.items() if ids},
                destroyed=self.destroyed,
                modules=self.modules,
                orphans=self.orphans,
                commands=self.applied_commands(),
            )
        )

    @classmethod
    def decode_snapshot(cls, data: bytes) -> Projections:
        """The projections ``encode_snapshot`` wrote. Raises ``msgspec.DecodeError`` or
        ``msgspec.ValidationError`` for bytes that are not such a checkpoint, or one of
        another format (the caller folds the history instead)."""
        snap = _checkpoint_decoder.decode(data)
        if (snap.format, snap.packing) != (CHECKPOINT_FORMAT, compact.FORMAT):
            raise msgspec.ValidationError(
                f"checkpoint format {snap.format}.{snap.packing}; "
                f"this version reads {CHECKPOINT_FORMAT}.{compact.FORMAT}"
            )
        proj = cls()
        proj.position = snap.position
        ids: dict[int, uuid.UUID] = {}
        proj.adopt(
            snap.sessions, snap.by_status, snap.by_module, compact.renumbering(snap.names), ids
        )
        proj.destroyed = snap.destroyed
        proj.modules = snap.modules
        proj.orphans = snap.orphans
        proj.commands = {cid.int: shared_session_id(a, ids) for cid, a in snap.commands}
        return proj

    def adopt(
        self,
        sessions: Iterable[tuple[uuid.UUID, WorkflowSession | bytes]],
        by_status: Mapping[SessionStatus, Iterable[uuid.UUID]],
        by_module: Mapping[str, Iterable[uuid.UUID]],
        mapping: list[int] | None,
        ids: dict[int, uuid.UUID],
    ) -> None:
        """Take sessions as another process's table held them (``SessionTable.entries``)
        with its status and module indexes: packed states renumbered by ``mapping``
        (``compact.renumbering``), every index holding the one id object of a session,
        recorded in ``ids`` by ``UUID.int``. Unpacked states are stored as recently
        folded, so they are packed once they cool."""
        table = self.sessions
        for sid, value in sessions:
            if isinstance(value, bytes):
                ids[sid.int] = sid
                table.adopt(sid, compact.renumber(value, mapping) if mapping else value)
            else:
                ids[sid.int] = value.session_id
                table.put(value)
        for status, members in by_status.items():
            self.by_status[status].update(ids.get(m.int, m) for m in members)
        for module_id, members in by_module.items():
            self.by_module.setdefault(module_id, set()).update(ids.get(m.int, m) for m in members)

    @classmethod
    def restore(cls, snap: ProjectionSnapshot) -> Projections:
        """Projections holding ``snapshot()``'s read models."""
        proj = cls()
        proj.position = snap.position
        for session in snap.sessions:
            sid = session.session_id
            proj.sessions.put(session)
            proj.by_status[session.status].add(sid)
            for module_id in session.modules:
                proj.by_module.setdefault(module_id, set()).add(sid)
        proj.destroyed = snap.destroyed
        proj.modules = dict(snap.modules)
        proj.orphans = {k: dict(v) for k, v in snap.orphans.items()}
        proj.commands = {cid.int: outcome for cid, outcome in snap.commands}
        return proj


class _Checkpoint(msgspec.Struct, array_like=True):
    """The persisted read models. A checkpoint is a cache: one that cannot be read, or
    of another ``format`` (this layout) or ``packing`` (``compact.FORMAT``), is set
    aside and the history folded instead."""

    format: int
    packing: int
    position: int
    names: list[str]  # the module-name numbers the packed states use
    sessions: list[tuple[uuid.UUID, bytes | WorkflowSession]]  # as ``SessionTable.entries``
    by_status: dict[SessionStatus, list[uuid.UUID]]
    by_module: dict[str, list[uuid.UUID]]
    destroyed: int
    modules: dict[str, ModuleRegistered]
    orphans: dict[uuid.UUID, dict[str, uuid.UUID]]
    commands: list[tuple[uuid.UUID, Accepted]]


CHECKPOINT_FORMAT: Final = 2
_checkpoint_encoder: Final = msgspec.msgpack.Encoder(uuid_format="bytes")
_checkpoint_decoder: Final = msgspec.msgpack.Decoder(_Checkpoint)
_encoder: Final = msgspec.msgpack.Encoder()
_uuid_list_decoder: Final = msgspec.msgpack.Decoder(list[uuid.UUID])


def shared_session_id(accepted: Accepted, ids: Mapping[int, uuid.UUID]) -> Accepted:
    """``accepted`` naming its session by the id object of ``ids`` (by ``UUID.int``),
    the one the indexes hold, rather than a copy of its own."""
    sid = accepted.session_id
    own = None if sid is None else ids.get(sid.int)
    return (
        accepted if own is None or own is sid else msgspec.structs.replace(accepted, session_id=own)
    )


def uuids(keys: Iterable[int]) -> list[uuid.UUID]:
    """The ``UUID`` of each ``UUID.int``, made by msgspec (``uuid.UUID(int=…)`` is
    Python code, twice as slow)."""
    return _uuid_list_decoder.decode(_encoder.encode([key.to_bytes(16, "big") for key in keys]))


def integrity_report(
    session_id: uuid.UUID,
    session: WorkflowSession | None,
    orphans: dict[str, uuid.UUID],
    registered: set[str],
) -> SessionIntegrityReport:
    """The seed's SessionIntegrityReport for one session, with what to do about it."""
    recommendations: list[str] = []
    if session is None:
        if orphans:
            recommendations.extend(
                f"destroy orphaned {m} session {sid} (its workflow session is unknown)"
                for m, sid in sorted(orphans.items())
            )
        else:
            recommendations.append("unknown workflow session: nothing to check")
        return SessionIntegrityReport(
            workflow_session_id=session_id,
            is_valid=False,
            orphaned_sessions=orphans,
            recommendations=recommendations,
        )
    linked = sorted(session.modules)
    missing: list[str] = []
    if not session.destroyed and session.status in ACTIVE_STATUSES:
        missing = [m for m in session.required_modules if m not in session.modules]
    inconsistent: dict[str, SessionStatus] = {}
    for module_id, info in session.modules.items():
        if _inconsistent(session.status, info.status):
            inconsistent[module_id] = info.status
    if missing:
        if session.status is _S.INITIALIZING:
            recommendations.append("waiting for required modules to link: " + ", ".join(missing))
        else:
            recommendations.append(
                "fail the session: required modules are no longer linked: " + ", ".join(missing)
            )
    for module_id, status in sorted(inconsistent.items()):
        if session.status in ACTIVE_STATUSES:
            recommendations.append(
                f"fail the session: required module {module_id} is {status}"
                if module_id in session.required_modules
                else f"unlink {module_id}: its session is {status} while the workflow is "
                f"{session.status}"
            )
        else:
            recommendations.append(
                f"destroy the session: it is {session.status} but {module_id} is still {status}"
            )
    recommendations.extend(
        f"destroy orphaned {m} session {sid}" for m, sid in sorted(orphans.items())
    )
    unregistered = sorted(m for m in linked if m not in registered)
    recommendations.extend(f"module {m} is linked but no longer registered" for m in unregistered)
    waiting = session.status is _S.INITIALIZING and not inconsistent and not orphans
    return SessionIntegrityReport(
        workflow_session_id=session_id,
        is_valid=(waiting or not missing) and not inconsistent and not orphans,
        linked_modules=linked,
        missing_links=missing,
        orphaned_sessions=orphans,
        inconsistent_statuses=inconsistent,
        recommendations=recommendations,
    )


def _inconsistent(workflow: SessionStatus, module: SessionStatus) -> bool:
    """A module session status that contradicts its workflow session's status."""
    if workflow in ACTIVE_STATUSES:
        return module in (_S.FAILED, _S.CANCELLED)
    if workflow in TERMINAL_STATUSES:
        return module in ACTIVE_STATUSES
    return False
