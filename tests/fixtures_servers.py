"""Session-scoped pytest fixtures for the real local servers (see tests/servers.py).

Use from a conftest.py or a test module: ``pytest_plugins = ["tests.fixtures_servers"]``
or ``from tests.fixtures_servers import bigtable_emulator  # noqa: F401``.

Each fixture yields ``host:port`` and sets the client environment variable
(BIGTABLE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST) for the session, restoring it afterwards.
A server that cannot be had on this machine (no Google Cloud CLI, no java, the BigQuery
server venv cannot be installed) fails the tests that use it, saying what to install.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests import servers


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _start(factory):
    try:
        cm = factory()
        address = cm.__enter__()
    except servers.ServerError as exc:
        # A missing real part is a failure, not a skip: CI installs what tests need.
        pytest.fail(f"{exc} — install the Google Cloud CLI with its emulators", pytrace=False)
    return cm, address


def _emulator(factory, env_name: str) -> Iterator[str]:
    cm, address = _start(factory)
    try:
        with _env(env_name, address):
            yield address
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def bigtable_emulator() -> Iterator[str]:
    yield from _emulator(servers.bigtable_emulator, "BIGTABLE_EMULATOR_HOST")


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[str]:
    yield from _emulator(servers.pubsub_emulator, "PUBSUB_EMULATOR_HOST")


@pytest.fixture(scope="session")
def bigquery_server() -> Iterator[str]:
    """``host:port`` of local-bigquery; REST under ``http://host:port/bigquery/v2/``."""
    try:
        servers.ensure_bigquery_server_installed()
    except (OSError, subprocess.CalledProcessError) as exc:  # no Python 3.13 / registry
        pytest.fail(f"BigQuery server not installable: {exc} — run scripts/setup_bigquery_server",
                    pytrace=False)
    cm, address = _start(lambda: servers.bigquery_server(install=False))
    try:
        yield address
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """Bootstrap ``host:port`` of one local Kafka broker (scripts/kafka)."""
    try:
        cm = servers.kafka_broker()
        address = cm.__enter__()
    except servers.ServerError as exc:
        pytest.fail(f"{exc} — scripts/kafka needs java 17+ and maven (jars resolved once "
                    "into .cache/)", pytrace=False)
    try:
        yield address
    finally:
        cm.__exit__(None, None, None)

