"""The running coordinator: writer, outbox relay, command server, leader and metrics."""
