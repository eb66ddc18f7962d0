"""``sessionctl``'s commands, one module per group: ``run`` (coordinator, demo,
module), ``sessions`` (sessions and modules), ``queues``, ``dlq``, ``store`` (replay,
audit export), ``console`` (the web console); ``common`` is what they share.
``sessionctl.cli`` puts them together."""
