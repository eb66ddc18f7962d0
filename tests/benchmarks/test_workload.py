"""The benchmarks' generated stores: brought to where a running coordinator keeps them."""

from __future__ import annotations

from pathlib import Path

from benchmarks.workload import as_running, generate
from contracts import Topology
from coordinator.service.relay import relay_checkpoint
from coordinator.store.eventstore import EventStore


def test_as_running_completes_the_lookup_and_marks_every_event_published(tmp_path: Path) -> None:
    with EventStore(f"sqlite:///{tmp_path / 'g.sqlite'}") as store:
        made = generate(store, sessions=40, may_end=True, activity=(1, 2))
        topology = Topology("gen")
        assert store.module_links_position() == 0
        as_running(store, topology)
        end = store.max_position()
        assert store.module_links_position() == end
        relay = store.checkpoints.get(relay_checkpoint(topology))
        assert relay is not None
        assert relay[0] == end
        # Every Linked pair of the log is in the lookup, destroyed sessions' included.
        linked = [pair for _, pairs in store.module_links(0, end) for pair in pairs]
        assert linked
        assert made.sessions == 40
        for module_session, workflow_session in linked:
            assert workflow_session in store.workflow_sessions_of(module_session)
