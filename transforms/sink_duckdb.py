"""The embedded default warehouse: one DuckDB file with the contract's three tables.

Writes are idempotent: the changelog and dead letter are keyed (see schemas/duckdb.sql)
and inserted with ON CONFLICT DO NOTHING, and metric_latest only moves to a higher
revision. Re-running the same input, or a runner retrying a bundle, leaves the same rows.

DuckDB allows one writing process per file, so each bundle opens, writes in one
transaction and closes, retrying while another worker holds the lock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
import duckdb
import pyarrow as pa
from apache_beam.metrics import Metrics

import schemas
from schemas import METRICS_NAMESPACE

LOCK_RETRY_SECONDS = 120.0
# DuckDB's Python client fails with concurrent connections to one file from several
# threads of a process (catalog write-write conflict on CREATE, "python_arrow_scan does
# not exist" on registered Arrow tables), and runners run bundles on threads: every
# connection this module opens for writing is used under this lock.
_PROCESS_LOCK = threading.Lock()


def connect(path: str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open `path`, retrying while another process holds DuckDB's file lock."""
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    delay = 0.02
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(schemas.read_text("duckdb.sql"))


_SKETCH = schemas.SKETCH_COLUMN


def _arrow(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pa.Table:
    """The rows' columns, plus the optional sketch (NULL where a row has none)."""
    table = {c: [row[c] for row in rows] for c in columns}
    table[_SKETCH] = pa.array([row.get(_SKETCH) for row in rows], type=pa.binary())
    return pa.table(table)


def write_changelog(con: duckdb.DuckDBPyConnection, rows: Sequence[schemas.ChangelogRow]
                    ) -> None:
    con.register("changelog_batch", _arrow(rows, schemas.CHANGELOG_COLUMNS))
    cols = ", ".join((*schemas.CHANGELOG_COLUMNS, _SKETCH))
    con.execute(f"INSERT INTO metric_changelog ({cols}) SELECT {cols} FROM changelog_batch "
                "ON CONFLICT DO NOTHING")
    newest: dict[tuple, schemas.ChangelogRow] = {}
    for row in rows:
        if row["sign"] < 0:
            continue
        key = (row["metric"], row["dims"], row["granularity"], row["window_start"])
        if key not in newest or newest[key]["revision"] < row["revision"]:
            newest[key] = row
    if not newest:
        return
    con.register("latest_batch", _arrow(list(newest.values()), schemas.LATEST_COLUMNS))
    cols = ", ".join((*schemas.LATEST_COLUMNS, _SKETCH))
    updates = ", ".join(f"{c} = excluded.{c}"
                        for c in (*schemas.LATEST_COLUMNS[4:], _SKETCH))
    con.execute(
        f"INSERT INTO metric_latest ({cols}) SELECT {cols} FROM latest_batch "
        f"ON CONFLICT DO UPDATE SET {updates} "
        "WHERE excluded.revision > metric_latest.revision")


def write_dead_letters(con: duckdb.DuckDBPyConnection,
                       rows: Sequence[schemas.DeadLetterRow]) -> None:
    batch = pa.table({
        "dead_letter_id": [r["dead_letter_id"] for r in rows],
        "payload": pa.array([r["payload"] for r in rows], type=pa.binary()),
        "reason": [r["reason"] for r in rows],
        "detail": [r["detail"] for r in rows],
        "ingest_time": [r["ingest_time"] for r in rows],
    })
    con.register("dead_letter_batch", batch)
    cols = ", ".join(schemas.DEAD_LETTER_COLUMNS)
    con.execute(f"INSERT INTO dead_letter ({cols}) SELECT {cols} FROM dead_letter_batch "
                "ON CONFLICT DO NOTHING")


class _WriteBundleFn(beam.DoFn):
    """Buffers a bundle's rows and writes them in one transaction at bundle end."""

    def __init__(self, path: str, table: str) -> None:
        self._path = path
        self._table = table
        self._written = Metrics.counter(METRICS_NAMESPACE, f"duckdb_rows.{table}")

    def setup(self) -> None:
        with _PROCESS_LOCK:
            con = connect(self._path)
            try:
                create_tables(con)
            finally:
                con.close()

    def start_bundle(self) -> None:
        self._rows: list[Any] = []

    def process(self, row: Any) -> None:
        self._rows.append(row)

    def finish_bundle(self) -> None:
        if not self._rows:
            return
        with _PROCESS_LOCK:
            con = connect(self._path)
            try:
                con.execute("BEGIN TRANSACTION")
                if self._table == "dead_letter":
                    write_dead_letters(con, self._rows)
                else:
                    write_changelog(con, self._rows)
                con.execute("COMMIT")
            finally:
                con.close()
        self._written.inc(len(self._rows))
        self._rows = []


class WriteToDuckDB(beam.PTransform):
    """(changelog rows, dead-letter rows) → metric_changelog, metric_latest, dead_letter."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def expand(self, outputs: tuple[beam.PCollection, beam.PCollection]) -> beam.pvalue.PDone:
        changelog, dead_letters = outputs
        changelog | "WriteChangelog" >> beam.ParDo(_WriteBundleFn(self._path, "changelog"))
        dead_letters | "WriteDeadLetters" >> beam.ParDo(
            _WriteBundleFn(self._path, "dead_letter"))
        return beam.pvalue.PDone(changelog.pipeline)


def read_rows(path: str, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
    con = connect(path, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


_SERIES_COLUMNS = (*schemas.LATEST_COLUMNS, "pane_index")
# metric_latest has no pane_index: it comes from the changelog row of the same revision
# (sign +1), so a series row has the same fields as read_series_from_bigtable's.
_SERIES_SQL = f"""
    SELECT {", ".join(f"l.{c}" for c in schemas.LATEST_COLUMNS)}, c.pane_index
    FROM metric_latest l
    JOIN metric_changelog c
      USING (metric, dims, granularity, window_start, revision)
    WHERE c.sign > 0 AND l.metric = ? AND l.granularity = ? AND l.dims = ?
      AND l.window_start >= coalesce(?, l.window_start)
      AND l.window_start < coalesce(?, l.window_start + INTERVAL 1 SECOND)
    ORDER BY l.window_start"""


def read_series_from_duckdb(
        path: str, metric: str, granularity: str,
        dims: str | Mapping[str, Any] = "{}",
        start: datetime | None = None, end: datetime | None = None,
) -> list[dict[str, Any]]:
    """One metric's series for one dims value, oldest window first (metric_latest).

    ``start`` is inclusive and ``end`` exclusive (window_start bounds, tz-aware), as in
    ``sink_bigtable.read_series_from_bigtable``; each dict has the same keys.
    """
    rows = read_rows(path, _SERIES_SQL,
                     (metric, granularity, schemas.dims_text(dims), start, end))
    series = [dict(zip(_SERIES_COLUMNS, row, strict=True)) for row in rows]
    for row in series:
        for column in ("window_start", "window_end", "emitted_at"):
            row[column] = row[column].astimezone(UTC)
    return series


_HELD_SQL = """
    SELECT l.metric, l.dims, l.granularity, l.window_start, l.window_end, l.value,
           l.revision, coalesce(c.pane_index, 0), l.timing, l.is_final, l.emitted_at
    FROM metric_latest l
    LEFT JOIN metric_changelog c
      ON c.metric = l.metric AND c.dims = l.dims AND c.granularity = l.granularity
     AND c.window_start = l.window_start AND c.revision = l.revision AND c.sign = 1
    WHERE l.window_start >= ? AND l.window_start < ?"""


def read_latest_rows(path: str, start: datetime, end: datetime
                     ) -> list[schemas.ChangelogRow]:
    """The +1 changelog row of every key's latest revision, for windows starting in
    [start, end): what a correction has to retract. pane_index comes from the
    changelog, the rest from metric_latest (the changelog always has the row; the
    coalesce only keeps a hand-edited table readable)."""
    with _PROCESS_LOCK:
        con = connect(path)  # not read-only: creates the tables of a new file
        try:
            create_tables(con)
            rows = con.execute(_HELD_SQL, [start, end]).fetchall()
        finally:
            con.close()
    return [{
        "metric": metric, "dims": dims, "granularity": granularity,
        "window_start": window_start.astimezone(UTC),
        "window_end": window_end.astimezone(UTC), "value": value, "sign": 1,
        "revision": revision, "pane_index": pane_index, "timing": timing,
        "is_final": is_final, "emitted_at": emitted_at.astimezone(UTC),
    } for (metric, dims, granularity, window_start, window_end, value, revision,
           pane_index, timing, is_final, emitted_at) in rows]


_SKETCHES_SQL = """
    SELECT window_start, value, sketch FROM metric_latest
    WHERE metric = ? AND granularity = ? AND dims = ?
      AND window_start >= ? AND window_start < ?
    ORDER BY window_start"""


def read_sketches_from_duckdb(path: str, metric: str, granularity: str, dims: str,
                              start: datetime, end: datetime
                              ) -> list[tuple[datetime, int, bytes | None]]:
    """(window_start, latest value, its sketch or None) of windows starting in
    [start, end): what a distinct count over a range unions."""
    return [(ws.astimezone(UTC), value, sketch) for ws, value, sketch in read_rows(
        path, _SKETCHES_SQL, (metric, granularity, dims, start, end))]
