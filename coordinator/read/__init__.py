"""The coordinator's read side: projections folded from the event log."""
