"""`clickstream retention`: delete what is older than its retention period.

    raw archive partitions (event_date)  ─┐ --retention_days
    dead letters (ingest_time)           ─┘
    aggregates (window_end): DuckDB rows, Bigtable rows, BigQuery partitions
                                          ── --aggregate_retention_days (longer)

Raw events and refused payloads carry personal data and are kept only as long as
finalize and investigations need them; aggregates carry none (no id, counts only) and
are kept longer. Run it daily (cron, Cloud Scheduler); it is idempotent.

BigQuery expires partitions itself: the tables get a partition expiration (dead_letter
is partitioned by ingest_time, metric_changelog by window_start), so deleting there is
BigQuery's job after this sets it. Bigtable's age-based GC rule does not apply: the
sink stamps each cell with its revision (transforms/sink_bigtable.py), not a wall-clock
time, so an age rule would expire by revision number; expired windows' rows are deleted
by key instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

import schemas
from pipeline.options import ClickstreamOptions
from transforms.archive import archive_files
from transforms.correct import utc_now
from transforms.sink_bigquery import CHANGELOG_TABLE, DEAD_LETTER_TABLE
from transforms.sink_duckdb import connect

log = logging.getLogger("clickstream")
DAY = timedelta(days=1)


class RetentionOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("retention")
        group.add_argument("--retention_days", type=int, default=0,
                           help="Days the raw archive (by event date) and dead letters "
                                "(by ingest time) are kept (0: forever). Must outlast "
                                "finalize's horizon (1 day + --allowed_lateness_s).")
        group.add_argument("--aggregate_retention_days", type=int, default=0,
                           help="Days metric windows are kept in every store, by window "
                                "end (0: forever); at least --retention_days.")


@dataclass
class RetentionSummary:
    archive_files_deleted: list[str] = field(default_factory=list)
    dead_letters_deleted: int = 0
    aggregate_rows_deleted: dict[str, int] = field(default_factory=dict)
    bigquery_expiration_days: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        return "\n".join([
            f"raw archive: {len(self.archive_files_deleted):,} expired files deleted",
            f"dead letters deleted: {self.dead_letters_deleted:,}",
            "aggregate rows deleted: " + (", ".join(
                f"{store} {n:,}" for store, n in sorted(self.aggregate_rows_deleted.items()))
                or "none"),
            "BigQuery partition expiration: " + (", ".join(
                f"{table} {days} days" for table, days
                in sorted(self.bigquery_expiration_days.items())) or "not set"),
        ])


def check_periods(raw_days: int, aggregate_days: int, allowed_lateness_s: int) -> None:
    """Refuse periods that would lose data finalize or the aggregates still need."""
    horizon = DAY + timedelta(seconds=allowed_lateness_s)
    if raw_days and timedelta(days=raw_days) <= horizon:
        raise SystemExit(
            f"--retention_days {raw_days} would delete raw events before finalize's horizon "
            f"({horizon.days} days {horizon.seconds // 3600} h: 1 day + "
            f"--allowed_lateness_s): keep them longer")
    if aggregate_days and raw_days and aggregate_days < raw_days:
        raise SystemExit("--aggregate_retention_days must be at least --retention_days "
                         "(or 0: forever)")
    if raw_days < 0 or aggregate_days < 0:
        raise SystemExit("retention periods are days >= 0 (0: forever)")


def expire_archive(base_path: str, now: datetime, days: int) -> list[str]:
    """Deletes the archive files of event dates before now - days; returns them."""
    cutoff = f"{(now - timedelta(days=days)).date():%Y-%m-%d}"
    expired = [path for path in archive_files(base_path)
               if path.split("event_date=", 1)[1][:10] < cutoff]
    if expired:
        FileSystems.delete(expired)
    if "://" not in base_path:  # local: drop the emptied partition directories
        for path in expired:
            hour_dir = os.path.dirname(path)
            for directory in (hour_dir, os.path.dirname(hour_dir)):
                try:
                    os.rmdir(directory)
                except OSError:
                    break  # not empty: other files remain
    return expired


def expire_duckdb(path: str, now: datetime, raw_days: int, aggregate_days: int
                  ) -> tuple[int, int]:
    """(dead letters, aggregate rows) deleted from the DuckDB file."""
    con = connect(path)
    try:
        con.execute(schemas.read_text("duckdb.sql"))
        dead = aggregates = 0
        if raw_days:
            dead = _deleted_count(con.execute(
                "DELETE FROM dead_letter WHERE ingest_time < ?",
                [now - timedelta(days=raw_days)]))
        if aggregate_days:
            cutoff = now - timedelta(days=aggregate_days)
            for table in ("metric_changelog", "metric_latest"):
                aggregates += _deleted_count(con.execute(
                    f"DELETE FROM {table} WHERE window_end <= ?", [cutoff]))
        return dead, aggregates
    finally:
        con.close()


def _deleted_count(result: Any) -> int:
    row = result.fetchone()  # DuckDB answers a DELETE with the number of rows
    return int(row[0]) if row else 0


def expire_bigtable(project: str, instance: str, table: str, now: datetime,
                    days: int) -> int:
    """Deletes the rows of windows that ended before now - days; returns how many.
    The window start is the row key's last part (#YYYYMMDDHH, sink_bigtable.row_key);
    windows last at most a day, so a start a day before the cutoff has ended by it."""
    from google.cloud.bigtable import Client
    from google.cloud.bigtable.row_filters import StripValueTransformerFilter

    tbl = Client(project=project, admin=True).instance(instance).table(table)
    cutoff = f"{(now - timedelta(days=days) - DAY):%Y%m%d%H}"
    doomed = [row.row_key for row in tbl.read_rows(filter_=StripValueTransformerFilter(True))
              if row.row_key.rsplit(b"#", 1)[-1].decode("ascii") < cutoff]
    if doomed:
        tbl.mutate_rows([_deleted(tbl, key) for key in doomed])
    return len(doomed)


def _deleted(tbl: Any, key: bytes) -> Any:
    row = tbl.direct_row(key)
    row.delete()
    return row


def set_bigquery_expiration(project: str, dataset: str, raw_days: int,
                            aggregate_days: int, client: Any = None) -> dict[str, int]:
    """Partition expiration on both tables (0 days: none set); returns what was set."""
    if client is None:
        from google.cloud import bigquery

        client = bigquery.Client(project=project)
    applied = {}
    for table, days in ((DEAD_LETTER_TABLE, raw_days), (CHANGELOG_TABLE, aggregate_days)):
        if not days:
            continue
        resource = client.get_table(f"{project}.{dataset}.{table}")
        resource.time_partitioning.expiration_ms = days * 86_400_000
        client.update_table(resource, ["time_partitioning"])
        applied[table] = days
    return applied


def run_retention(argv: Sequence[str], clock: Callable[[], datetime] = utc_now,
                  bigquery_test_client: Any = None) -> RetentionSummary:
    options = PipelineOptions(list(argv))
    retention = options.view_as(RetentionOptions)
    clickstream = options.view_as(ClickstreamOptions)
    raw_days, aggregate_days = retention.retention_days, retention.aggregate_retention_days
    check_periods(raw_days, aggregate_days, clickstream.allowed_lateness_s)
    if not (raw_days or aggregate_days):
        raise SystemExit("nothing to do: give --retention_days and/or "
                         "--aggregate_retention_days")
    now = clock()
    summary = RetentionSummary()
    if raw_days and clickstream.archive_path:
        summary.archive_files_deleted = expire_archive(clickstream.archive_path, now,
                                                       raw_days)
    if clickstream.duckdb_path:
        dead, aggregates = expire_duckdb(clickstream.duckdb_path, now, raw_days,
                                         aggregate_days)
        summary.dead_letters_deleted += dead
        summary.aggregate_rows_deleted["duckdb"] = aggregates
    bigtable = clickstream.bigtable_target()
    if bigtable is not None and aggregate_days:
        summary.aggregate_rows_deleted["bigtable"] = expire_bigtable(*bigtable, now,
                                                                     aggregate_days)
    bigquery = clickstream.bigquery_target()
    if bigquery is not None:
        summary.bigquery_expiration_days = set_bigquery_expiration(
            *bigquery, raw_days, aggregate_days, bigquery_test_client)
    return summary
