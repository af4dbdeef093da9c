"""finalize corrects every configured store against its own rows: DuckDB, the Bigtable
emulator and local-bigquery, started by the tests.

The stores first hold a partial day (the job ran over three of the four input files,
as if the fourth had arrived after the stream's lateness horizon), while the raw
archive holds the whole day; after `finalize` each store's latest values for the day
equal the exact answer, with BATCH revisions on top of what that store held.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import oracle
from pipeline.compare import changelog_mismatches, differences, latest_from_duckdb
from pipeline.finalize import day_bounds, run_finalize
from pipeline.generator import GeneratorConfig, read_truth, write_dataset
from pipeline.job import build, run
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.fixtures_servers import bigquery_server, bigtable_emulator  # noqa: F401
from transforms.metrics import DEFAULT_FUNNEL
from transforms.sink_bigquery import read_latest_rows_from_bigquery
from transforms.sink_bigtable import read_latest_rows_from_bigtable
from transforms.sink_duckdb import connect, read_latest_rows, write_changelog

pytestmark = pytest.mark.integration  # the Bigtable emulator and local-bigquery

DAY = "2026-11-01"
PROJECT, INSTANCE, TABLE = "test-project", "test-instance", "finalize_latest"
BQ_PROJECT, BQ_DATASET = "local", "finalize"
FINALIZED_AT = datetime(2026, 11, 5, 3, 0, tzinfo=UTC)


def _store_flags(db: str) -> list[str]:
    return ["--duckdb_path", db, "--bigtable_project", PROJECT, "--bigtable_instance",
            INSTANCE, "--bigtable_table", TABLE, "--bigquery_project", BQ_PROJECT,
            "--bigquery_dataset", BQ_DATASET]


def _latest(rows) -> dict[oracle.MetricKey, int]:
    return {(r["metric"], r["dims"], r["granularity"],
             r["window_start"].astimezone(UTC).isoformat()): r["value"] for r in rows}


@pytest.fixture(scope="module")
def finalized(bigtable_emulator, bigquery_server, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("every-sink")
    data, archive = str(root / "data"), str(root / "archive")
    write_dataset(data, GeneratorConfig(events=2000, seed=7, date=DAY))
    # The archive gets the whole input (a run whose DuckDB file is thrown away) ...
    run(["--input_files", os.path.join(data, "events-*.jsonl"),
         "--duckdb_path", str(root / "archive-run.duckdb"), "--archive_path", archive,
         "--archive_run_id", "all"], progress_every_s=60)
    # ... the three stores only three files of four.
    db = str(root / "stores.duckdb")
    client = servers.LocalBigQueryTestClient(bigquery_server, BQ_PROJECT)
    options = PipelineOptions(["--input_files",
                               os.path.join(data, "events-0000[0-2]-of-00004.jsonl"),
                               *_store_flags(db)])
    p = beam.Pipeline(options=options)
    build(p, options.view_as(ClickstreamOptions), bigquery_test_client=client)
    p.run().wait_until_finish()

    start, end = day_bounds(DAY)
    start_ms, end_ms = (int(t.timestamp() * 1000) for t in (start, end))
    want = oracle.expected_metrics(
        [e for e in read_truth(data) if start_ms <= e.event_time_ms < end_ms],
        DEFAULT_FUNNEL)
    # The stores disagree: DuckDB alone already got the exact value of one window
    # (say a late pane reached it and not the others). Corrected against DuckDB's rows,
    # Bigtable and BigQuery would keep their stale value for that window.
    repaired = next(r for r in read_latest_rows(db, start, end)
                    if r["value"] != want.get(_latest([r]).popitem()[0]))
    con = connect(db)
    try:
        write_changelog(con, [
            dict(repaired, sign=-1),
            dict(repaired, value=want[_latest([repaired]).popitem()[0]],
                 revision=repaired["revision"] + 1, timing="LATE")])
    finally:
        con.close()
    held = {
        "duckdb": {k: v for k, v in latest_from_duckdb(db).items()
                   if start.isoformat() <= k[3] < end.isoformat()},
        "bigtable": _latest(read_latest_rows_from_bigtable(PROJECT, INSTANCE, TABLE,
                                                           start, end)),
        "bigquery": _latest(read_latest_rows_from_bigquery(BQ_PROJECT, BQ_DATASET, start,
                                                           end, client=client)),
    }
    summary = run_finalize(["--date", DAY, "--archive_path", archive, "--distinct", "exact",
                            *_store_flags(db)], clock=lambda: FINALIZED_AT,
                           bigquery_test_client=client)
    after = {
        "duckdb": {k: v for k, v in latest_from_duckdb(db).items()
                   if start.isoformat() <= k[3] < end.isoformat()},
        "bigtable": read_latest_rows_from_bigtable(PROJECT, INSTANCE, TABLE, start, end),
        "bigquery": read_latest_rows_from_bigquery(BQ_PROJECT, BQ_DATASET, start, end,
                                                   client=client),
    }
    return held, after, want, summary, db, _latest([repaired]).popitem()[0]


def test_the_stores_held_a_partial_day_before(finalized) -> None:
    held, _, want, _, _, _ = finalized
    for store, values in held.items():
        assert differences(values, want), f"{store} already held the exact day"


@pytest.mark.parametrize("store", ["duckdb", "bigtable", "bigquery"])
def test_every_store_ends_at_the_exact_day(finalized, store) -> None:
    _, after, want, _, _, _ = finalized
    values = after[store] if store == "duckdb" else _latest(after[store])
    assert differences(values, want) == []


@pytest.mark.parametrize("store", ["bigtable", "bigquery"])
def test_each_store_got_batch_revisions_above_what_it_held(finalized, store) -> None:
    held, after, want, _, _, repaired = finalized
    rows = {(r["metric"], r["dims"], r["granularity"],
             r["window_start"].astimezone(UTC).isoformat()): r for r in after[store]}
    changed = [k for k in set(held[store]) | set(want)
               if held[store].get(k) != want.get(k)]
    assert changed
    for key in changed:
        if key in rows:  # a key only the store had is retracted to 0
            assert rows[key]["timing"] == "BATCH" and rows[key]["is_final"], key
    assert all(r["is_final"] for r in after[store])
    # The window only DuckDB had right: this store still needed (and got) a correction.
    assert repaired in changed and rows[repaired]["timing"] == "BATCH"


def test_duckdb_changelog_still_sums_to_latest_and_counters_per_store(finalized) -> None:
    _, _, _, summary, db, _ = finalized
    assert changelog_mismatches(db) == []
    counters = summary.counters
    assert counters.get("finalize_windows_corrected", 0) > 0
    assert counters.get("finalize_windows_corrected.bigtable", 0) > 0
    assert counters.get("finalize_windows_corrected.bigquery", 0) > 0
