"""A streaming job relaunched without its state into the same stores: loud, never
below the stores' revisions, and repaired exactly by finalize.

Run 1 streams part of a day into DuckDB and the local BigQuery server (with the raw
archive) and is drained (its stream ends: every window final). Run 2 starts without
run 1's state, on more events for the same windows (and repeats of run 1's, which its
fresh dedup state cannot know), reading what the stores hold at launch as a streaming
launch does (pipeline/job.py held_at_launch). Then finalize recomputes the day from
the archive. Checked: run 2 said it had no state (counter and a log line per window),
its revisions went above run 1's, the changelog invariant held after it in both
stores, and after finalize every window equals the oracle in both.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from pipeline import oracle
from pipeline.compare import changelog_mismatches, differences, latest_from_duckdb
from pipeline.finalize import run_finalize
from pipeline.graph import ClickstreamMetrics, write_to_sinks
from pipeline.job import counters_of, held_at_launch
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.fixtures_servers import bigquery_server  # noqa: F401  (fixture)
from tests.streaming import at, payload, streaming_options
from tests.test_sink_bigquery import invariant_mismatches, latest_from_bigquery
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig
from transforms.sink_duckdb import read_rows

pytestmark = pytest.mark.integration

DAY = "2026-11-01"
DATASET = "relaunch"
LATENESS_S = 6 * 3600
CONFIG = MetricsConfig(allowed_lateness_s=LATENESS_S, late_firing_s=0)
FINALIZED_AT = datetime(2026, 11, 3, tzinfo=UTC)

# (event_id, user, hour, minute) per run; run 2 repeats e1 and e2.
RUN_1 = [("e1", "u1", 10, 5), ("e2", "u2", 10, 10), ("e3", "u1", 11, 0)]
RUN_2 = [("e1", "u1", 10, 5), ("e2", "u2", 10, 10), ("e4", "u3", 10, 40),
         ("e5", "u4", 12, 15)]


def stream(events: list[tuple[str, str, int, int]]) -> TestStream:
    s = TestStream().advance_watermark_to(at(9))
    for event_id, user, hour, minute in events:
        t = at(hour, minute)
        s = s.add_elements([TimestampedValue(payload(event_id, t, user=user), t)]
                           ).advance_processing_time(61)
    return s.advance_watermark_to(at(13)).advance_watermark_to_infinity()


def store_flags(db: str, archive: str) -> list[str]:
    return ["--duckdb_path", db, "--bigquery_project", "local", "--bigquery_dataset",
            DATASET, "--archive_path", archive, "--distinct", "exact",
            "--allowed_lateness_s", str(LATENESS_S)]


def launch(events, db: str, archive: str, run_id: str, launched_at: datetime,
           client) -> dict[str, int]:
    """A streaming launch as pipeline/job.py's build makes it, on a TestStream."""
    argv = [*store_flags(db, archive), "--archive_run_id", run_id]
    options = ClickstreamOptions(argv)
    held = held_at_launch(options, LATENESS_S, launched_at, client)
    with beam.Pipeline(options=streaming_options()) as p:
        outputs = p | stream(events) | ClickstreamMetrics(
            CONFIG, archive=options.raw_archive(bounded=False), held=held)
        write_to_sinks(outputs, options.sinks(client))
    return counters_of(p.result)


@pytest.fixture(scope="module")
def relaunched(bigquery_server, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("relaunch")
    db, archive = str(root / "stores.duckdb"), str(root / "archive")
    client = servers.LocalBigQueryTestClient(bigquery_server, "local")
    launch(RUN_1, db, archive, "run1", datetime(2026, 11, 1, 11, 30, tzinfo=UTC), client)
    run_1_revisions = max_revisions(db)
    log = _Records()
    logging.getLogger("clickstream").addHandler(log)
    try:
        counters = launch(RUN_2, db, archive, "run2",
                          datetime(2026, 11, 1, 12, 30, tzinfo=UTC), client)
    finally:
        logging.getLogger("clickstream").removeHandler(log)
    after_run_2 = {"duckdb": changelog_mismatches(db),
                   "bigquery": invariant_mismatches(client, DATASET)}
    revisions = max_revisions(db)
    summary = run_finalize(["--date", DAY, *store_flags(db, archive)],
                           clock=lambda: FINALIZED_AT, bigquery_test_client=client)
    return {"counters": counters, "log": log.messages, "after_run_2": after_run_2,
            "run_1_revisions": run_1_revisions, "revisions": revisions, "db": db,
            "client": client, "summary": summary}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def max_revisions(db: str) -> dict[tuple, int]:
    rows = read_rows(db, "SELECT metric, dims, granularity, window_start, max(revision) "
                         "FROM metric_changelog GROUP BY ALL")
    return {tuple(r[:4]): r[4] for r in rows}


def expected() -> dict:
    truth = oracle.first_copies(
        oracle.TruthEvent(i, "page_view", int(at(h, m) * 1000), u, None, 0)
        for i, u, h, m in RUN_1 + RUN_2)
    return oracle.expected_metrics(truth, DEFAULT_FUNNEL)


def test_the_relaunch_said_it_had_no_state_naming_the_windows(relaunched) -> None:
    # The hour 10:00 and the day: run 1 wrote them; 12:00 is new to the stores.
    # >= 1, not == 2: this runner's streaming counters keep one bundle's increments
    # (read reports 1 for this 4-event stream too); the log line is per window.
    assert relaunched["counters"].get("windows_relaunched_without_state", 0) >= 1
    named = [m for m in relaunched["log"] if "relaunched without its state" in m]
    assert len(named) == 2
    assert any("hour window 2026-11-01T10:00:00+00:00" in m for m in named)
    assert any("day window 2026-11-01T00:00:00+00:00" in m for m in named)
    assert all(f"clickstream finalize --date {DAY}" in m for m in named)


def test_the_relaunch_wrote_above_the_stores_revisions(relaunched) -> None:
    before, after = relaunched["run_1_revisions"], relaunched["revisions"]
    touched = [k for k in before if k[2] == "day" or k[3].hour == 10]  # both runs wrote
    assert touched
    for key in touched:
        assert after[key] > before[key], key


def test_the_changelog_invariant_held_after_the_relaunch(relaunched) -> None:
    assert relaunched["after_run_2"] == {"duckdb": [], "bigquery": []}


def test_finalize_makes_every_window_exact_in_every_store(relaunched) -> None:
    want, db, client = expected(), relaunched["db"], relaunched["client"]
    assert differences(latest_from_duckdb(db), want) == []
    assert differences(latest_from_bigquery(client, DATASET), want) == []
    assert changelog_mismatches(db) == []
    assert invariant_mismatches(client, DATASET) == []
    assert relaunched["summary"].counters.get("finalize_windows_corrected", 0) > 0
