"""`clickstream retention` with a fake clock: raw archive partitions and dead letters
older than --retention_days go, aggregates only after --aggregate_retention_days, in
DuckDB, the Bigtable emulator and local-bigquery (partition expiration)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.retention import run_retention
from tests import servers
from tests.fixtures_servers import bigquery_server, bigtable_emulator  # noqa: F401
from transforms.archive import archive_files, rewrite_archive_file
from transforms.events import Event
from transforms.sink_bigquery import ensure_dataset_and_tables
from transforms.sink_bigtable import ensure_table, read_all_rows, to_direct_row
from transforms.sink_duckdb import (
    connect,
    create_tables,
    read_rows,
    write_changelog,
    write_dead_letters,
)

NOW = datetime(2026, 12, 31, 12, 0, tzinfo=UTC)
RAW_DAYS, AGGREGATE_DAYS = 7, 30
AGES_DAYS = (1, 6, 8, 20, 29, 31, 90)  # of the test's data, before NOW
PROJECT, INSTANCE, TABLE = "test-project", "test-instance", "retention_latest"
BQ_PROJECT, BQ_DATASET = "local", "retention"


def _changelog_row(window_start: datetime, granularity: str = "day") -> dict:
    size = timedelta(days=1) if granularity == "day" else timedelta(hours=1)
    return {"metric": "events", "dims": '{"event_type":"tap"}', "granularity": granularity,
            "window_start": window_start, "window_end": window_start + size, "value": 3,
            "sign": 1, "revision": 1, "pane_index": 0, "timing": "ON_TIME",
            "is_final": True, "emitted_at": window_start + size}


def _day_start(age_days: int) -> datetime:
    t = NOW - timedelta(days=age_days)
    return datetime(t.year, t.month, t.day, tzinfo=UTC)


def _stores(tmp_path) -> tuple[str, str]:
    archive, db = str(tmp_path / "archive"), str(tmp_path / "out.duckdb")
    for age in AGES_DAYS:
        start = _day_start(age)
        part = os.path.join(archive, f"event_date={start:%Y-%m-%d}", "event_hour=05")
        os.makedirs(part)
        ms = int(start.timestamp() * 1000) + 5 * 3_600_000
        rewrite_archive_file(os.path.join(part, "part-x.avro"),
                             [Event(f"e{age}", "tap", ms, "d", "u", None, None, {}).to_avro()])
    con = connect(db)
    try:
        create_tables(con)
        write_changelog(con, [_changelog_row(_day_start(age)) for age in AGES_DAYS])
        write_dead_letters(con, [{"dead_letter_id": f"dl{age}", "payload": b"{",
                                  "reason": "malformed_json", "detail": "",
                                  "ingest_time": NOW - timedelta(days=age, hours=1)}
                                 for age in AGES_DAYS])
    finally:
        con.close()
    return archive, db


def _flags(archive: str, db: str) -> list[str]:
    return ["--archive_path", archive, "--duckdb_path", db, "--allowed_lateness_s", "86400",
            "--retention_days", str(RAW_DAYS),
            "--aggregate_retention_days", str(AGGREGATE_DAYS)]


def test_expired_partitions_dead_letters_and_aggregates_go_each_at_its_age(tmp_path) -> None:
    archive, db = _stores(tmp_path)
    summary = run_retention(_flags(archive, db), clock=lambda: NOW)
    # Expected from the ages alone: a day is expired when it started before the
    # cutoff's date (raw) or ended at or before the cutoff (aggregates).
    raw_cutoff, agg_cutoff = NOW - timedelta(days=RAW_DAYS), NOW - timedelta(days=AGGREGATE_DAYS)
    kept_dates = sorted(f"{_day_start(a):%Y-%m-%d}" for a in AGES_DAYS
                        if _day_start(a).date() >= raw_cutoff.date())
    assert [p.split("event_date=")[1][:10] for p in archive_files(archive)] == kept_dates
    assert len(summary.archive_files_deleted) == len(AGES_DAYS) - len(kept_dates) > 0
    assert sorted(os.listdir(archive)) == [f"event_date={d}" for d in kept_dates]
    assert [r[0] for r in read_rows(db, "SELECT dead_letter_id FROM dead_letter ORDER BY 1")] \
        == sorted(f"dl{a}" for a in AGES_DAYS if a < RAW_DAYS)
    kept_windows = sorted(_day_start(a) for a in AGES_DAYS
                          if _day_start(a) + timedelta(days=1) > agg_cutoff)
    for table in ("metric_changelog", "metric_latest"):
        got = [r[0] for r in read_rows(db, f"SELECT window_start FROM {table} ORDER BY 1")]
        assert got == kept_windows, table
    assert summary.aggregate_rows_deleted["duckdb"] == 2 * (len(AGES_DAYS) - len(kept_windows))
    again = run_retention(_flags(archive, db), clock=lambda: NOW)
    assert again.archive_files_deleted == [] and again.dead_letters_deleted == 0
    assert again.aggregate_rows_deleted["duckdb"] == 0


def test_raw_retention_inside_finalize_horizon_is_refused(tmp_path) -> None:
    with pytest.raises(SystemExit, match="finalize's horizon"):
        run_retention(["--archive_path", str(tmp_path), "--retention_days", "3",
                       "--allowed_lateness_s", str(3 * 86400)], clock=lambda: NOW)
    with pytest.raises(SystemExit, match="at least --retention_days"):
        run_retention(["--archive_path", str(tmp_path), "--retention_days", "10",
                       "--aggregate_retention_days", "9"], clock=lambda: NOW)


@pytest.mark.integration
def test_bigtable_rows_expire_and_bigquery_tables_get_partition_expiration(
        tmp_path, bigtable_emulator, bigquery_server) -> None:  # noqa: F811
    ensure_table(PROJECT, INSTANCE, TABLE)
    from google.cloud.bigtable import Client

    tbl = Client(project=PROJECT, admin=True).instance(INSTANCE).table(TABLE)
    rows = [_changelog_row(_day_start(a)) for a in AGES_DAYS] + [
        _changelog_row(_day_start(a) + timedelta(hours=23), "hour") for a in AGES_DAYS]
    tbl.mutate_rows([to_direct_row(r) for r in rows])
    client = servers.LocalBigQueryTestClient(bigquery_server, BQ_PROJECT)
    ensure_dataset_and_tables(BQ_PROJECT, BQ_DATASET, test_client=client)
    summary = run_retention(
        ["--duckdb_path", "", "--allowed_lateness_s", "86400",
         "--retention_days", str(RAW_DAYS), "--aggregate_retention_days",
         str(AGGREGATE_DAYS), "--bigtable_project", PROJECT, "--bigtable_instance",
         INSTANCE, "--bigtable_table", TABLE, "--bigquery_project", BQ_PROJECT,
         "--bigquery_dataset", BQ_DATASET], clock=lambda: NOW, bigquery_test_client=client)
    cutoff = NOW - timedelta(days=AGGREGATE_DAYS) - timedelta(days=1)
    left = sorted((r["granularity"], r["window_start"])
                  for r in read_all_rows(PROJECT, INSTANCE, TABLE))
    assert left == sorted((r["granularity"], r["window_start"]) for r in rows
                          if r["window_start"] >= cutoff.replace(minute=0))
    assert summary.aggregate_rows_deleted["bigtable"] == len(rows) - len(left) > 0
    for table, days in (("dead_letter", RAW_DAYS), ("metric_changelog", AGGREGATE_DAYS)):
        resource = client.get_table(f"{BQ_PROJECT}.{BQ_DATASET}.{table}")
        assert resource.time_partitioning.expiration_ms == days * 86_400_000, table
