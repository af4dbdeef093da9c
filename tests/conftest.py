"""Shared pytest configuration: markers used across the suite."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "prism: runs the job on Prism (built by scripts/fetch_prism, "
        "isolated in a network namespace); select with -m prism, skip with -m 'not prism'")
