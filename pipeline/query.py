"""`clickstream query`: one metric's time series from DuckDB, Bigtable or BigQuery.

Every store answers with the same row dicts (``read_series_from_duckdb``,
``read_series_from_bigtable``, ``read_series_from_bigquery``: the ``metric_latest``
columns per window), and this module alone turns them into output, so a dashboard or
a test sees the same columns, order and formatting whichever store it reads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import schemas

STORES = ("duckdb", "bigtable", "bigquery")
FORMATS = ("table", "json")
# The output columns, in order: metric_latest's per-window fields.
COLUMNS = ("window_start", "window_end", "value", "revision", "timing", "is_final",
           "emitted_at")
_WIDTHS = {"window_start": 20, "window_end": 20, "value": 12, "revision": 8,
           "timing": 7, "is_final": 5, "emitted_at": 27}

# (metric, granularity, canonical dims, start, end) -> series rows, oldest first
SeriesReader = Callable[[str, str, str, datetime | None, datetime | None],
                        list[dict[str, Any]]]


class QueryError(SystemExit):
    """A query that cannot run as asked; the message says why and what to do."""


def parse_time(text: str | None) -> datetime | None:
    """ISO-8601 date or timestamp; a value without an offset is UTC."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise QueryError(f"not an ISO-8601 time: {text!r} (e.g. 2026-11-01T06:00Z)") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_dims(text: str) -> str:
    """A dims JSON object in canonical form (sorted keys, string values, `{}` for none)."""
    try:
        dims = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(f"--dims is not JSON: {text!r} (e.g. '{{\"event_type\":"
                         "\"page_view\"}')") from exc
    if not isinstance(dims, dict):
        raise QueryError(f"--dims must be a JSON object, got {text!r}")
    return schemas.canonical_dims(dims)


def bigquery_client(project: str, endpoint: str) -> Any:
    """A google-cloud-bigquery client for ``--bigquery_endpoint``, or None for Google's.

    An endpoint is a local server speaking the BigQuery REST API (e.g. local-bigquery at
    ``http://127.0.0.1:9050``, REST under ``/bigquery/v2/``): it gets anonymous
    credentials, as no such server checks them. None lets ``read_series_from_bigquery``
    build its default client (Application Default Credentials).
    """
    if not endpoint:
        return None
    if "://" not in endpoint:
        raise QueryError(f"--bigquery_endpoint needs a scheme: {endpoint!r} "
                         "(e.g. http://127.0.0.1:9050)")
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint.rstrip("/")))


def _bigquery_reader(project: str, dataset: str, endpoint: str = "") -> SeriesReader:
    if not (project and dataset):
        raise QueryError("--from bigquery needs --bigquery_project and --bigquery_dataset")
    from transforms.sink_bigquery import LATEST_VIEW, read_series_from_bigquery

    read = read_series_from_bigquery
    view = LATEST_VIEW  # the sink's metric_latest view, where Bigtable has a table
    client = bigquery_client(project, endpoint)
    return lambda m, g, d, s, e: read(project, dataset, view, m, g, d, s, e, client=client)


def reader_for(store: str, settings: Mapping[str, str]) -> SeriesReader:
    """The series reader of one store; its module is imported only when it is asked for."""
    if store == "duckdb":
        from transforms.sink_duckdb import read_series_from_duckdb

        path = settings["duckdb_path"]
        return lambda m, g, d, s, e: read_series_from_duckdb(path, m, g, d, s, e)
    if store == "bigtable":
        from transforms.sink_bigtable import read_series_from_bigtable

        where = (settings["bigtable_project"], settings["bigtable_instance"],
                 settings["bigtable_table"])
        if not all(where):
            raise QueryError("--from bigtable needs --bigtable_project, "
                             "--bigtable_instance and --bigtable_table")
        return lambda m, g, d, s, e: read_series_from_bigtable(*where, m, g, d, s, e)
    if store == "bigquery":
        return _bigquery_reader(settings["bigquery_project"], settings["bigquery_dataset"],
                                settings.get("bigquery_endpoint", ""))
    raise QueryError(f"unknown store {store!r}; one of {', '.join(STORES)}")


def _cell(column: str, value: Any) -> Any:
    """One output value, the same for every store: UTC ISO times with Z, plain ints."""
    if isinstance(value, datetime):
        text = value.astimezone(UTC).isoformat(timespec="microseconds"
                                               if column == "emitted_at" else "seconds")
        return text.replace("+00:00", "Z")
    if column in ("value", "revision"):
        return int(value)
    if column == "is_final":
        return bool(value)
    return str(value)


def normalise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The output columns of each row, in order, formatted alike whatever the store."""
    return [{c: _cell(c, row[c]) for c in COLUMNS}
            for row in sorted(rows, key=lambda r: r["window_start"])]


def _pad(column: str, text: str) -> str:
    # Numbers right-aligned (with their header) so digits line up; the rest left.
    if column in ("value", "revision"):
        return text.rjust(_WIDTHS[column])
    return text.ljust(_WIDTHS[column])


def render(rows: Sequence[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1)
    lines = ["  ".join(_pad(c, c) for c in COLUMNS).rstrip()]
    for row in rows:
        cells = []
        for c in COLUMNS:
            value = row[c]
            text = ("true" if value else "false") if c == "is_final" else str(value)
            cells.append(_pad(c, text))
        lines.append("  ".join(cells).rstrip())
    lines.append(f"({len(rows)} windows)")
    return "\n".join(lines)


def query(read: SeriesReader, metric: str, granularity: str, dims: str = "{}",
          start: datetime | None = None, end: datetime | None = None) -> list[dict[str, Any]]:
    if granularity not in schemas.GRANULARITIES:
        raise QueryError(f"--granularity must be one of {', '.join(schemas.GRANULARITIES)}")
    return normalise(read(metric, granularity, dims, start, end))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metric", required=True,
                        help="events, active_users, funnel_step or feature_users")
    parser.add_argument("--granularity", required=True, choices=schemas.GRANULARITIES)
    parser.add_argument("--dims", default="{}",
                        help='JSON object of the series\' dims, e.g. \'{"event_type":"click"}\'')
    parser.add_argument("--start", default=None,
                        help="first window_start (inclusive), ISO-8601, UTC if no offset")
    parser.add_argument("--end", default=None, help="last window_start (exclusive)")
    parser.add_argument("--from", dest="store", required=True, choices=STORES)
    parser.add_argument("--format", dest="fmt", default="table", choices=FORMATS)
    add_bigquery_arguments(parser)


def add_bigquery_arguments(parser: argparse.ArgumentParser) -> None:
    """The BigQuery connection flags of the readers (`query`, `serve`): the job's own
    BigQuery options do not reach a local server."""
    parser.add_argument("--bigquery_project", default="")
    parser.add_argument("--bigquery_dataset", default="")
    parser.add_argument("--bigquery_endpoint", default="",
                        help="BigQuery REST endpoint of a local server, e.g. "
                        "http://127.0.0.1:9050 (anonymous credentials); empty: Google's")


def run_query(args: argparse.Namespace, settings: Mapping[str, str]) -> str:
    """The rendered output of `clickstream query`; `settings` holds connection flags."""
    read = reader_for(args.store, {**settings, "bigquery_project": args.bigquery_project,
                                   "bigquery_dataset": args.bigquery_dataset,
                                   "bigquery_endpoint": args.bigquery_endpoint})
    rows = query(read, args.metric, args.granularity, parse_dims(args.dims),
                 parse_time(args.start), parse_time(args.end))
    return render(rows, args.fmt)
