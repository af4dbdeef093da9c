"""What the API reads from each store: DuckDB, Bigtable or BigQuery, the three sinks.

One metric's series comes from `pipeline.query.reader_for`, the same readers as
`clickstream query`. The rest (every dims value of a metric at once, the stored sketches,
one window's changelog, dead letters by reason) is read here, one small query per store.
Bigtable holds the latest value per window only: it answers the changelog and dead-letter
questions with `NotHeld`, which the API turns into a 404 saying which store does hold it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import schemas
from pipeline import query

Row = dict[str, Any]
SketchRow = tuple[datetime, int, bytes | None]  # window_start, value, sketch


class NotHeld(LookupError):
    """The store does not keep what was asked (the message says which store does)."""


class Store(Protocol):
    name: str

    def data_version(self) -> Hashable | None:
        """Changes whenever the data may have; None: the store cannot tell cheaply."""
        ...

    def series(self, metric: str, granularity: str, dims: str,
               start: datetime | None, end: datetime | None) -> list[Row]: ...

    def latest(self, metric: str, granularity: str, start: datetime, end: datetime
               ) -> list[Row]: ...

    def sketches(self, metric: str, granularity: str, dims: str, start: datetime,
                 end: datetime) -> list[SketchRow]: ...

    def changelog(self, metric: str, granularity: str, dims: str, window_start: datetime
                  ) -> list[Row]: ...

    def dead_letters(self, start: datetime | None, end: datetime | None
                     ) -> list[tuple[str, int]]: ...


def _utc(row: Row) -> Row:
    for column in ("window_start", "window_end", "emitted_at"):
        if isinstance(row.get(column), datetime):
            row[column] = row[column].astimezone(UTC)
    return row


_LATEST = ("dims", "window_start", "value", "revision", "timing", "is_final", "emitted_at")
_CHANGELOG = ("revision", "sign", "value", "timing", "is_final", "pane_index", "emitted_at")


class DuckDBStore:
    """Reads a DuckDB file the job may be writing.

    DuckDB lets one process write a file or several read it, never both: a connection
    kept open here would lock the job's sink out. So every read opens the file read-only
    and closes it, which costs more than the query (tens of ms on a busy machine); and
    answers are kept per data version, the (mtime, size) of the file and its WAL, taken
    before the read. Any write by the job changes the version, so a cached answer is
    never older than the file; `cache=False` reads every time. Cached rows are shared
    between requests: callers build new rows, never change these.
    """

    name = "duckdb"
    CACHE_ENTRIES = 4096

    def __init__(self, path: str, cache: bool = True) -> None:
        self.path = path
        self._series = query.reader_for("duckdb", {"duckdb_path": path})
        self._cache: OrderedDict[tuple, tuple[tuple, Any]] | None = \
            OrderedDict() if cache else None
        self._lock = threading.Lock()

    def _version(self) -> tuple:
        def stamp(path: str) -> tuple[int, int]:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return (0, 0)
            return (st.st_mtime_ns, st.st_size)

        return stamp(self.path), stamp(self.path + ".wal")

    def data_version(self) -> Hashable | None:
        return self._version() if self._cache is not None else None

    def _cached(self, key: tuple, read: Callable[[], Any]) -> Any:
        if self._cache is None:
            return read()
        version = self._version()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == version:
                self._cache.move_to_end(key)
                return hit[1]
        value = read()
        with self._lock:
            self._cache[key] = (version, value)
            self._cache.move_to_end(key)
            while len(self._cache) > self.CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    def _rows(self, sql: str, params: list[Any], columns: tuple[str, ...]) -> list[Row]:
        from transforms.sink_duckdb import read_rows

        return self._cached(("rows", sql, *params), lambda: [
            _utc(dict(zip(columns, r, strict=True)))
            for r in read_rows(self.path, sql, params)])

    def series(self, metric, granularity, dims, start, end):
        return self._cached(("series", metric, granularity, dims, start, end),
                            lambda: self._series(metric, granularity, dims, start, end))

    def latest(self, metric, granularity, start, end):
        return self._rows(
            f"SELECT {', '.join(_LATEST)} FROM metric_latest WHERE metric = ? AND "
            "granularity = ? AND window_start >= ? AND window_start < ? "
            "ORDER BY window_start, dims", [metric, granularity, start, end], _LATEST)

    def sketches(self, metric, granularity, dims, start, end):
        from transforms.sink_duckdb import read_sketches_from_duckdb

        return self._cached(("sketches", metric, granularity, dims, start, end),
                            lambda: read_sketches_from_duckdb(self.path, metric, granularity,
                                                              dims, start, end))

    def changelog(self, metric, granularity, dims, window_start):
        return self._rows(
            f"SELECT {', '.join(_CHANGELOG)} FROM metric_changelog WHERE metric = ? AND "
            "granularity = ? AND dims = ? AND window_start = ? ORDER BY revision, sign DESC",
            [metric, granularity, dims, window_start], _CHANGELOG)

    def dead_letters(self, start, end):
        from transforms.sink_duckdb import read_rows

        sql = ("SELECT reason, count(*) FROM dead_letter "
               "WHERE ingest_time >= coalesce(?, ingest_time) "
               "AND ingest_time < coalesce(?, ingest_time + INTERVAL 1 SECOND) "
               "GROUP BY reason ORDER BY count(*) DESC, reason")
        return self._cached(("dead_letters", start, end), lambda: [
            (reason, int(n)) for reason, n in read_rows(self.path, sql, [start, end])])


class BigtableStore:
    name = "bigtable"

    def data_version(self) -> Hashable | None:
        return None  # no cheap way to know: read per request

    def __init__(self, project: str, instance: str, table: str) -> None:
        self.where = (project, instance, table)
        self._series = query.reader_for("bigtable", {
            "bigtable_project": project, "bigtable_instance": instance,
            "bigtable_table": table})

    def series(self, metric, granularity, dims, start, end):
        return self._series(metric, granularity, dims, start, end)

    def latest(self, metric, granularity, start, end):
        from transforms.sink_bigtable import read_metric_from_bigtable

        return [{c: r[c] for c in _LATEST} for r in read_metric_from_bigtable(
            *self.where, metric, granularity, start, end)]

    def sketches(self, metric, granularity, dims, start, end):
        return [(r["window_start"], r["value"], r.get(schemas.SKETCH_COLUMN))
                for r in self.series(metric, granularity, dims, start, end)]

    def changelog(self, metric, granularity, dims, window_start):
        raise NotHeld("Bigtable holds the latest revision of each window only; serve "
                      "over DuckDB or BigQuery (--from duckdb|bigquery) for the changelog")

    def dead_letters(self, start, end):
        raise NotHeld("dead letters are not written to Bigtable; serve over DuckDB or "
                      "BigQuery (--from duckdb|bigquery) for them")


class BigQueryStore:
    name = "bigquery"

    def data_version(self) -> Hashable | None:
        return None  # no cheap way to know: read per request

    def __init__(self, project: str, dataset: str, endpoint: str = "") -> None:
        self.project, self.dataset = project, dataset
        self._client = query.bigquery_client(project, endpoint)
        self._series = query.reader_for("bigquery", {
            "bigquery_project": project, "bigquery_dataset": dataset,
            "bigquery_endpoint": endpoint})

    def _query(self, sql: str, params: Mapping[str, tuple[str, Any]]) -> list[Row]:
        from google.cloud import bigquery

        client = self._client or bigquery.Client(project=self.project)
        config = bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter(name, kind, value)
            for name, (kind, value) in params.items()])
        table = f"`{self.project}.{self.dataset}"
        job = client.query(sql.replace("`T", table), job_config=config)
        return [_utc(dict(row.items())) for row in job.result()]

    def series(self, metric, granularity, dims, start, end):
        return self._series(metric, granularity, dims, start, end)

    def _range(self, metric, granularity, start, end) -> dict[str, tuple[str, Any]]:
        return {"metric": ("STRING", metric), "granularity": ("STRING", granularity),
                "start": ("TIMESTAMP", start), "end": ("TIMESTAMP", end)}

    def latest(self, metric, granularity, start, end):
        rows = self._query(
            f"SELECT {', '.join(_LATEST)} FROM `T.metric_latest` WHERE metric = @metric "
            "AND granularity = @granularity AND window_start >= @start "
            "AND window_start < @end ORDER BY window_start, dims",
            self._range(metric, granularity, start, end))
        return [dict(r, value=int(r["value"]), revision=int(r["revision"])) for r in rows]

    def sketches(self, metric, granularity, dims, start, end):
        rows = self._query(
            "SELECT window_start, value, sketch FROM `T.metric_latest` WHERE metric = "
            "@metric AND granularity = @granularity AND dims = @dims AND window_start >= "
            "@start AND window_start < @end ORDER BY window_start",
            {**self._range(metric, granularity, start, end), "dims": ("STRING", dims)})
        return [(r["window_start"], int(r["value"]), r["sketch"]) for r in rows]

    def changelog(self, metric, granularity, dims, window_start):
        rows = self._query(
            f"SELECT DISTINCT {', '.join(_CHANGELOG)} FROM `T.metric_changelog` WHERE "
            "metric = @metric AND granularity = @granularity AND dims = @dims AND "
            "window_start = @ws ORDER BY revision, sign DESC",
            {"metric": ("STRING", metric), "granularity": ("STRING", granularity),
             "dims": ("STRING", dims), "ws": ("TIMESTAMP", window_start)})
        return [dict(r, **{c: int(r[c]) for c in ("revision", "sign", "value", "pane_index")})
                for r in rows]

    def dead_letters(self, start, end):
        conditions, params = ["TRUE"], {}
        if start is not None:
            conditions.append("ingest_time >= @start")
            params["start"] = ("TIMESTAMP", start)
        if end is not None:
            conditions.append("ingest_time < @end")
            params["end"] = ("TIMESTAMP", end)
        rows = self._query(
            "SELECT reason, COUNT(DISTINCT dead_letter_id) AS n FROM `T.dead_letter` "
            f"WHERE {' AND '.join(conditions)} GROUP BY reason ORDER BY n DESC, reason",
            params)
        return [(r["reason"], int(r["n"])) for r in rows]


def open_store(store: str, settings: Mapping[str, str]) -> Store:
    """The store `clickstream serve --from` names, with the connection flags of
    `clickstream query`; a missing flag raises query.QueryError saying which."""
    if store == "duckdb":
        if not settings.get("duckdb_path"):
            raise query.QueryError("--from duckdb needs --duckdb_path")
        return DuckDBStore(settings["duckdb_path"], cache=settings.get("cache", "1") == "1")
    if store == "bigtable":
        where = (settings.get("bigtable_project", ""), settings.get("bigtable_instance", ""),
                 settings.get("bigtable_table", ""))
        if not all(where):
            raise query.QueryError("--from bigtable needs --bigtable_project, "
                                   "--bigtable_instance and --bigtable_table")
        return BigtableStore(*where)
    if store == "bigquery":
        project, dataset = settings.get("bigquery_project", ""), settings.get(
            "bigquery_dataset", "")
        if not (project and dataset):
            raise query.QueryError(
                "--from bigquery needs --bigquery_project and --bigquery_dataset")
        return BigQueryStore(project, dataset, settings.get("bigquery_endpoint", ""))
    raise query.QueryError(f"unknown store {store!r}; one of {', '.join(query.STORES)}")
