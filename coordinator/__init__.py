"""sessionbus coordinator: the only writer of session lifecycle events."""
