"""Wiring: options, the top-level graph, the command line and the event generator."""
