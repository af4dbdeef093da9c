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

import datasketches
import pytest

from pipeline import oracle
from pipeline.generator import GeneratorConfig, read_truth, write_days
from pipeline.job import run
from tests import servers
from transforms import sink_duckdb
from transforms.distinct import SKETCH_TYPE, union_estimate

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


def late_revision(db: str, day: datetime, extra_users: int) -> int:
    """Writes what the job writes for a late pane of `day`'s active users: the retraction
    of the latest revision and a LATE revision whose sketch also counts `extra_users`
    users synced late. Returns the new value."""
    latest = sink_duckdb.read_rows(db, """
        SELECT l.window_end, l.value, l.revision, c.pane_index, l.timing, l.is_final,
               l.emitted_at, l.sketch
        FROM metric_latest l JOIN metric_changelog c
        USING (metric, dims, granularity, window_start, revision)
        WHERE c.sign > 0 AND metric = 'active_users' AND granularity = 'day'
          AND window_start = ?""", [day])[0]
    window_end, value, revision, pane_index, timing, is_final, emitted_at, sketch = latest
    late = datasketches.hll_sketch(12, SKETCH_TYPE)
    for i in range(extra_users):
        late.update(f"late-user-{i}")
    merged = union_estimate([sketch, late.serialize_compact()])
    new_sketch = datasketches.hll_union(12)
    new_sketch.update(datasketches.hll_sketch.deserialize(sketch))
    new_sketch.update(late)
    held = {"metric": "active_users", "dims": "{}", "granularity": "day",
            "window_start": day, "window_end": window_end.astimezone(UTC), "value": value,
            "sign": 1, "revision": revision, "pane_index": pane_index, "timing": timing,
            "is_final": is_final, "emitted_at": emitted_at.astimezone(UTC),
            "sketch": sketch}
    now = datetime.now(UTC)
    rows = [dict(held, sign=-1, emitted_at=now),
            dict(held, value=merged.estimate, revision=revision + 1,
                 pane_index=pane_index + 1, timing="LATE", is_final=False, emitted_at=now,
                 sketch=new_sketch.get_result(SKETCH_TYPE).serialize_compact())]
    with sink_duckdb._PROCESS_LOCK:
        con = sink_duckdb.connect(db)
        try:
            con.execute("BEGIN TRANSACTION")
            sink_duckdb.write_changelog(con, rows)
            con.execute("COMMIT")
        finally:
            con.close()
    return merged.estimate
