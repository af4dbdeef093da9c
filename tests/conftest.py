"""Shared pytest configuration. The markers are registered in pyproject.toml."""

from __future__ import annotations

import pytest

# Fixtures that start a real server (tests/fixtures_servers.py). A test that asks for one
# is an integration test whether or not its author marked it, so `scripts/test --fast`
# never waits on an emulator.
SERVER_FIXTURES = frozenset({"bigtable_emulator", "pubsub_emulator", "bigquery_server",
                             "kafka_broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
