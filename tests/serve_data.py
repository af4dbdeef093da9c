"""A served data set for the serving tests: several generated days of one user population,
run once through the job into DuckDB with `--distinct hll` and the raw archive, and its
oracle (the generator's truth, independent of the pipeline).

Import the fixture into a test module: ``from tests.serve_data import served  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime

import pytest

from pipeline import oracle
from pipeline.generator import GeneratorConfig, read_truth, write_days
from pipeline.job import run
from tests import servers

DAYS = 8
EVENTS_PER_DAY = 800
FIRST_DAY = date(2026, 11, 1)


@dataclass(frozen=True)
class Served:
    data: str  # the merged generated data set
    db: str  # DuckDB written by the job
    archive: str  # the job's raw archive
    truth: list[oracle.TruthEvent]
    want: dict[oracle.MetricKey, int]  # the generator's oracle, per window
    expected: dict  # expected.json

    def identities(self, first: date, last: date, feature: str | None = None) -> set[str]:
        """Distinct identities of the truth's events dated in [first, last]."""
        return {e.identity for e in self.truth
                if first <= day_of(e.event_time_ms) <= last
                and (feature is None or (e.event_type == "feature_use"
                                         and e.feature == feature))}


def day_of(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).date()


def job_args(data: str, db: str, archive: str, *extra: str) -> list[str]:
    return ["--input_files", os.path.join(data, "events-*.jsonl"), "--duckdb_path", db,
            "--distinct", "hll", "--archive_path", archive, "--archive_buckets", "1", *extra]


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    data = str(tmp_path_factory.mktemp("served-data"))
    write_days(data, GeneratorConfig(events=EVENTS_PER_DAY, seed=21,
                                     date=FIRST_DAY.isoformat()), DAYS)
    out = tmp_path_factory.mktemp("served")
    db, archive = str(out / "served.duckdb"), str(out / "archive")
    summary = run(job_args(data, db, archive), progress_every_s=60)
    assert summary.reconciles
    with open(os.path.join(data, "expected.json")) as f:
        expected = json.load(f)
    return Served(data, db, archive, read_truth(data), oracle.from_json(expected["metrics"]),
                  expected)


def series_of(want: dict[oracle.MetricKey, int], metric: str, granularity: str,
              dims: str = "{}") -> dict[str, int]:
    return {w: v for (m, d, g, w), v in want.items() if (m, d, g) == (metric, dims, granularity)}


def within_hll_error(estimate: float, truth: Iterable | int, rse: float, sigmas: int = 3
                     ) -> bool:
    n = truth if isinstance(truth, int) else len(set(truth))
    return abs(estimate - n) <= sigmas * rse * n + 1


@contextlib.contextmanager
def clickstream_serve(*args: str, timeout: float = 60.0) -> Iterator[str]:
    """`clickstream serve ARGS` as its own process on a free 127.0.0.1 port; yields the
    base URL once the app answers, stops the process by its PID afterwards."""
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [os.path.join(os.path.dirname(sys.executable), "clickstream"), "serve",
           "--port", str(port), *args]
    with servers._running(cmd, lambda: servers._http_ok(f"{url}/openapi.json"), timeout,
                          "clickstream serve"):
        yield url
