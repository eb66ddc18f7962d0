"""sessionbus module SDK: what a module imports to take part in session lifecycle."""
