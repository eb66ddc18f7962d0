"""The coordinator's domain: aggregates and the rules they enforce, with no I/O."""
