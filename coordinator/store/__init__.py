"""The coordinator's event store: eventsourcing's recorders behind one URL."""
