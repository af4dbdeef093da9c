"""Bigtable serving sink: one row per (metric, granularity, dims, window), latest revision.

Input: changelog rows (``schemas.ChangelogRow`` dicts, tz-aware UTC datetimes). Retraction
rows (sign -1) are skipped: a dashboard wants the current value, not the changelog.

Row key: ``{metric}#{granularity}#{dims_hash}#{yyyymmddhh}`` (see schemas/bigtable.json),
where ``dims_hash`` is the first 16 hex chars of sha256 of the canonical dims JSON and
``yyyymmddhh`` is window_start in UTC (``hh`` = 00 for days). Why this shape:

- A dashboard reads one metric's time series for one dims value: with the series
  identity as the key prefix and the window last, that is one contiguous range scan,
  ordered by time (``read_series_from_bigtable``).
- The key does not start with a timestamp, so writes for the newest window do not all land
  on the last tablet: they spread over every (metric, granularity, dims) series. The hash
  (not the raw dims JSON) keeps keys short and fixed-size, and spreads one metric's dims
  values over its key range evenly. 64 bits of hash make collisions negligible; the dims
  JSON is stored in a column too and checked on read.
- The sink writes aggregates (a few rows per key per trigger firing), not raw events, so
  a single series' newest row is never a write hotspot.

Idempotence and ordering: every cell is written with the row's revision as its timestamp
(milliseconds since the epoch), and the column family keeps 1 version. A replayed pane
writes the same cells at the same timestamp (an overwrite, nothing doubles), and when
revisions arrive out of order (different bundles, retries) the highest revision is the
newest cell, so it wins whatever the write order. Reads ask for the newest cell per
column, so they are right even before garbage collection runs. The GC rule is max
versions, not max age: cell timestamps are revisions, not wall-clock times.

Writing. The rows go through Beam's own ``WriteToBigTable`` (``apache_beam.io.gcp.
bigtableio``, the Python writer, not the cross-language one) as DirectRows; the step
before it (``_ToDirectRowFn``) builds them and, with ``create_table``, creates the
table in its setup.

Outages and retries. Retrying is the Bigtable client's, not ours: ``WriteToBigTable``
hands each bundle's rows to the client's ``MutationsBatcher``, which in
google-cloud-bigtable 2.50 sends them in the background through the data client's
batcher (``mutate_rows``): it retries DEADLINE_EXCEEDED and UNAVAILABLE, and rows the
server answered with those codes, with exponential backoff (10 ms doubling to 60 s,
jittered), each attempt bounded to 60 s, for up to 600 s per request. It retries only
idempotent mutations, which ours are because every cell has an explicit timestamp.
Other errors (NOT_FOUND, PERMISSION_DENIED, INVALID_ARGUMENT) are not retried. Nothing
is logged or counted while it retries; what failed is raised when the bundle ends
(``finish_bundle`` closes the batcher) as ``MutationsBatchError: Errors in batch
mutations.``, with the API errors in its ``.exc``, and the bundle fails. Then the runner
decides: Dataflow retries a failed batch work item (4 times) and a streaming one until
it succeeds; Flink, with a restart strategy, restarts from its last checkpoint. Every
write is an idempotent overwrite (same cells, same revision timestamps), so a retried
bundle doubles nothing. The DirectRunner (FnApiRunner) does not retry a bundle: the job
fails, and ``clickstream run`` ends with a message that names the table and says what
to do (``explain_failure``, pipeline/job.py); re-running the same input is safe for the
same reason. tests/test_bigtable_faults.py pauses the emulator (SIGSTOP) mid-write and
resumes it: the client's retries ride it out and the table ends equal to the oracle
with no extra cell versions; and a write to a missing table fails ``clickstream run``
at once with that message.

Depends on Beam, google-cloud-bigtable and ``schemas`` only. Against the emulator set
BIGTABLE_EMULATOR_HOST.
"""

from __future__ import annotations

import hashlib
import json
import struct
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

import schemas
from schemas import METRICS_NAMESPACE

_SPEC = json.loads(schemas.read_text("bigtable.json"))
FAMILY = next(iter(_SPEC["column_families"]))
MAX_VERSIONS = _SPEC["column_families"][FAMILY]["gc_rule"]["max_versions"]
SEP = _SPEC["row_key"]["separator"]
_INT_COLUMNS = ("value", "revision", "pane_index")
_TIME_COLUMNS = ("window_start", "window_end", "emitted_at")
_TEXT_COLUMNS = ("metric", "granularity", "dims", "timing")
_SKETCH = schemas.SKETCH_COLUMN


def dims_hash(dims: str) -> str:
    """The 16-hex-char hash of a canonical dims JSON string used in row keys."""
    return hashlib.sha256(dims.encode("utf-8")).hexdigest()[:16]


def _window_token(window_start: datetime) -> str:
    return window_start.astimezone(UTC).strftime("%Y%m%d%H")


def series_prefix(metric: str, granularity: str, dims: str) -> bytes:
    """Key prefix of one series: every window of (metric, granularity, dims)."""
    return SEP.join((metric, granularity, dims_hash(dims), "")).encode("utf-8")


def row_key(row: Mapping[str, Any]) -> bytes:
    """``metric#granularity#dims_hash#yyyymmddhh`` for a changelog row."""
    return series_prefix(row["metric"], row["granularity"], row["dims"]) + \
        _window_token(row["window_start"]).encode("ascii")


def revision_timestamp(revision: int) -> datetime:
    """The cell timestamp of a revision: ``revision`` milliseconds after the epoch."""
    return datetime.fromtimestamp(revision / 1000.0, tz=UTC)


def _iso(ts: datetime) -> bytes:
    return ts.astimezone(UTC).isoformat().encode("ascii")


def encode_cells(row: Mapping[str, Any]) -> dict[str, bytes]:
    """Column name -> cell value for one changelog row (see schemas/bigtable.json)."""
    cells = {c: str(row[c]).encode("utf-8") for c in _TEXT_COLUMNS}
    cells.update({c: struct.pack(">q", int(row[c])) for c in _INT_COLUMNS})
    cells.update({c: _iso(row[c]) for c in _TIME_COLUMNS})
    cells["is_final"] = b"\x01" if row["is_final"] else b"\x00"
    if _SKETCH in row:
        # Written even when None (as empty): it then hides an older revision's sketch,
        # which counted another value.
        cells[_SKETCH] = row[_SKETCH] or b""
    return cells


def decode_cells(cells: Mapping[str, bytes]) -> dict[str, Any]:
    """The inverse of ``encode_cells``: a ``metric_latest``-shaped dict."""
    out: dict[str, Any] = {c: cells[c].decode("utf-8") for c in _TEXT_COLUMNS}
    out.update({c: struct.unpack(">q", cells[c])[0] for c in _INT_COLUMNS})
    out.update({c: datetime.fromisoformat(cells[c].decode("ascii"))
                for c in _TIME_COLUMNS})
    out["is_final"] = cells["is_final"] == b"\x01"
    if _SKETCH in cells:
        out[_SKETCH] = cells[_SKETCH] or None
    return out


def to_direct_row(row: Mapping[str, Any]):
    """A Bigtable DirectRow setting every column at the revision's timestamp."""
    from google.cloud.bigtable.row import DirectRow

    direct = DirectRow(row_key=row_key(row))
    ts = revision_timestamp(int(row["revision"]))
    for column, value in encode_cells(row).items():
        direct.set_cell(FAMILY, column.encode("ascii"), value, timestamp=ts)
    return direct


def _gc_rule():
    from google.cloud.bigtable import column_family
    return column_family.MaxVersionsGCRule(MAX_VERSIONS)


def _table(project: str, instance: str, table: str, admin: bool = False):
    from google.cloud.bigtable import Client
    return Client(project=project, admin=admin).instance(instance).table(table)


def ensure_table(project: str, instance: str, table: str) -> None:
    """Create the table and its column family (max 1 version) if missing; idempotent.

    The instance must exist (on the emulator any instance id works).
    """
    from google.api_core import exceptions

    tbl = _table(project, instance, table, admin=True)
    if not tbl.exists():
        try:
            tbl.create(column_families={FAMILY: _gc_rule()})
            return
        except exceptions.AlreadyExists:
            pass
    families = tbl.list_column_families()
    if FAMILY not in families:
        tbl.column_family(FAMILY, gc_rule=_gc_rule()).create()
    elif families[FAMILY].gc_rule != _gc_rule():
        tbl.column_family(FAMILY, gc_rule=_gc_rule()).update()




class _ToDirectRowFn(beam.DoFn):
    """Changelog row -> DirectRow; with ``create_table`` its setup creates the table.

    The table is created here, in the setup of the step right before the write, and not
    when the pipeline is built: setup runs where the writes run, with the workers'
    credentials and network (a job built on a laptop or in a flex template launcher may
    not reach the instance, or may lack table-admin rights there), and at run time, not
    when a graph was built. Every row reaches ``WriteToBigTable`` only after passing
    through an instance of this DoFn whose setup returned, so the table exists before
    the first write on every runner, without a side input or an extra stage. Many
    workers may race here; ``ensure_table`` tolerates AlreadyExists and costs one
    GetTable per DoFn instance once the table exists.
    """

    def __init__(self, project: str, instance: str, table: str, create_table: bool) -> None:
        self._target = (project, instance, table)
        self._create_table = create_table
        self._rows = Metrics.counter(METRICS_NAMESPACE, "bigtable_rows_to_write")

    def setup(self) -> None:
        if self._create_table:
            ensure_table(*self._target)

    def process(self, row: Mapping[str, Any]) -> Iterable[Any]:
        self._rows.inc()
        yield to_direct_row(row)


class WriteChangelogToBigtable(beam.PTransform):
    """Changelog row dicts -> one Bigtable row per (metric, granularity, dims, window).

    Skips retractions (sign -1); writes each +1 row with cell timestamps from its
    revision through Beam's ``WriteToBigTable``, so the newest cell is the latest
    revision and replays are overwrites. With ``create_table`` the step before the write
    creates the table when missing (``ensure_table``, see ``_ToDirectRowFn``); otherwise
    it must exist before the pipeline runs. ``flush_count`` is ``WriteToBigTable``'s:
    mutations per request (one per cell, 11 per row), not rows; None keeps Beam's 1000.
    Failures and retries: see the module docstring.
    """

    def __init__(self, project: str, instance: str, table: str,
                 flush_count: int | None = None, create_table: bool = False) -> None:
        super().__init__()
        self.project, self.instance, self.table = project, instance, table
        self.flush_count = flush_count
        self.create_table = create_table

    def expand(self, rows):
        from apache_beam.io.gcp.bigtableio import FLUSH_COUNT, WriteToBigTable

        return (
            rows
            | "SkipRetractions" >> beam.Filter(lambda r: int(r["sign"]) > 0)
            | "ToDirectRows" >> beam.ParDo(_ToDirectRowFn(
                self.project, self.instance, self.table, self.create_table))
            | "WriteToBigTable" >> WriteToBigTable(
                project_id=self.project, instance_id=self.instance, table_id=self.table,
                flush_count=self.flush_count or FLUSH_COUNT))


# What marks a run's failure as this sink's: a frame or type of the Bigtable client
# (MutationsBatchError, google.cloud.bigtable.*) or Beam's writer DoFn. Matched in the
# error's text because runners that run the SDK elsewhere (Prism, Dataflow) hand back the
# worker's traceback as text, not the exception; the FnApiRunner raises a RuntimeError
# whose __context__ is the client's error.
_FAILURE_MARKERS = ("google.cloud.bigtable", "google/cloud/bigtable", "_BigTableWriteFn")


def explain_failure(project: str, instance: str, table: str, error: BaseException
                    ) -> str | None:
    """What to do about a run that failed in this sink, or None when ``error`` is not
    the sink's (see ``_FAILURE_MARKERS``)."""
    if not any(m in "".join(traceback.format_exception(error)) for m in _FAILURE_MARKERS):
        return None
    return (f"the Bigtable sink failed on projects/{project}/instances/{instance}/tables/"
            f"{table}: {_api_error(error)}. Check that the instance is reachable "
            "(BIGTABLE_EMULATOR_HOST for the emulator, unset for a real instance), that "
            "the table exists or the job may create it, and that the job may write to it; "
            "then re-run the same input: every write is an idempotent overwrite (cell "
            "timestamp = revision), so nothing doubles.")


def _api_error(error: BaseException) -> str:
    """The first Google API error (NotFound, DeadlineExceeded, ...) under ``error``: the
    client's MutationsBatchError says only "Errors in batch mutations." and keeps the
    real errors in ``.exc``; exception groups keep theirs in ``.exceptions``."""
    from google.api_core import exceptions

    seen: list[BaseException] = []
    todo: list[Any] = [error]
    while todo:
        exc = todo.pop(0)
        if not isinstance(exc, BaseException) or any(exc is s for s in seen):
            continue
        seen.append(exc)
        if isinstance(exc, exceptions.GoogleAPIError):
            return f"{type(exc).__name__}: {exc}"
        nested = getattr(exc, "exc", None)
        todo += [exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ()),
                 *(nested if isinstance(nested, list) else [nested])]
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _decoded(row: Any) -> dict[str, Any]:
    """A row read with CellsColumnLimitFilter(1) as a ``metric_latest``-shaped dict."""
    return decode_cells({col.decode("ascii"): cells[0].value
                         for col, cells in row.cells.get(FAMILY, {}).items()})


def read_series_from_bigtable(
        project: str, instance: str, table: str, metric: str, granularity: str,
        dims: str | Mapping[str, Any] = "{}",
        start: datetime | None = None, end: datetime | None = None,
) -> list[dict[str, Any]]:
    """One metric's series for one dims value, oldest window first.

    ``start`` is inclusive and ``end`` exclusive (window_start bounds, tz-aware). Each
    dict has the ``metric_latest`` columns plus ``pane_index``.
    """
    from google.cloud.bigtable.row_filters import CellsColumnLimitFilter

    dims = schemas.dims_text(dims)
    prefix = series_prefix(metric, granularity, dims)
    start_key = prefix + (_window_token(start).encode("ascii") if start else b"")
    end_key = (prefix + _window_token(end).encode("ascii")) if end else \
        prefix[:-1] + bytes([prefix[-1] + 1])
    tbl = _table(project, instance, table)
    out = []
    for row in tbl.read_rows(start_key=start_key, end_key=end_key,
                             filter_=CellsColumnLimitFilter(1)):
        decoded = _decoded(row)
        if decoded["dims"] != dims:  # a hash collision: not this series
            continue
        if end is not None and decoded["window_start"] >= end:
            continue
        out.append(decoded)
    out.sort(key=lambda r: r["window_start"])
    return out


def read_latest_rows_from_bigtable(project: str, instance: str, table: str,
                                   start: datetime, end: datetime
                                   ) -> list[schemas.ChangelogRow]:
    """What the sink holds for windows starting in [start, end) (finalize): the latest
    row per key as the +1 changelog row a correction retracts. The window is the row
    key's last part, so a key regex selects the days of [start, end) on the server."""
    from google.cloud.bigtable.row_filters import (
        CellsColumnLimitFilter,
        RowFilterChain,
        RowKeyRegexFilter,
    )

    days, day = [], start.astimezone(UTC).date()
    while datetime.combine(day, datetime.min.time(), tzinfo=UTC) < end:
        days.append(f"{day:%Y%m%d}")
        day += timedelta(days=1)
    key_regex = ("^.*#(" + "|".join(days) + r")[0-9]{2}$").encode("ascii")
    rows = _table(project, instance, table).read_rows(filter_=RowFilterChain(filters=[
        RowKeyRegexFilter(key_regex), CellsColumnLimitFilter(1)]))
    out = []
    for row in rows:
        latest = _decoded(row)
        if start <= latest["window_start"] < end:
            out.append(dict(latest, sign=1))
    return out  # type: ignore[return-value]


def read_all_rows(project: str, instance: str, table: str) -> Iterable[dict[str, Any]]:
    """Every row of the table (newest cell per column), for tests and small tables."""
    from google.cloud.bigtable.row_filters import CellsColumnLimitFilter

    for row in _table(project, instance, table).read_rows(
            filter_=CellsColumnLimitFilter(1)):
        yield dict(_decoded(row), row_key=row.row_key.decode("utf-8"))


def read_metric_from_bigtable(project: str, instance: str, table: str, metric: str,
                              granularity: str, start: datetime, end: datetime
                              ) -> list[dict[str, Any]]:
    """Every dims value of one metric for windows starting in [start, end): one range
    scan of the ``metric#granularity#`` prefix (the dims hash precedes the window in the
    key, so the time range is applied to the decoded rows)."""
    from google.cloud.bigtable.row_filters import CellsColumnLimitFilter

    prefix = SEP.join((metric, granularity, "")).encode("utf-8")
    rows = _table(project, instance, table).read_rows(
        start_key=prefix, end_key=prefix[:-1] + bytes([prefix[-1] + 1]),
        filter_=CellsColumnLimitFilter(1))
    out = [decoded for decoded in map(_decoded, rows)
           if start <= decoded["window_start"] < end]
    out.sort(key=lambda r: (r["window_start"], r["dims"]))
    return out
