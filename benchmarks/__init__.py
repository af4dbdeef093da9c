"""Benchmarks of the clickstream graph (`python -m benchmarks.run --help`)."""
