"""sessionbus coordinator: the only writer of session lifecycle events.

Layers, lowest first; each imports only those below it:

- ``coordinator.domain``: the aggregates (workflow session, module registry), their
  packed form, identity rules and the clock.
- ``coordinator.store``: the event store on eventsourcing (SQLite, PostgreSQL, memory).
- ``coordinator.read``: projections folded from the log, and their rebuild.
- ``coordinator.service``: the running service: writer, relay (outbox), command server,
  leader, metrics and the runtime that starts them in order.
"""
