"""sessionbus operations: the ``sessionctl`` command line, the demo, broker definitions
and admin tools. The one layer that knows both the coordinator and the module SDK."""
