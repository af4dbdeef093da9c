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

Depends on Beam (``apache_beam.io.gcp.bigtableio.WriteToBigTable``), google-cloud-bigtable
and ``schemas`` only. Against the emulator set BIGTABLE_EMULATOR_HOST.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigtableio import WriteToBigTable

import schemas

_SPEC = json.loads(schemas.read_text("bigtable.json"))
FAMILY = next(iter(_SPEC["column_families"]))
MAX_VERSIONS = _SPEC["column_families"][FAMILY]["gc_rule"]["max_versions"]
SEP = _SPEC["row_key"]["separator"]
_INT_COLUMNS = ("value", "revision", "pane_index")
_TIME_COLUMNS = ("window_start", "window_end", "emitted_at")
_TEXT_COLUMNS = ("metric", "granularity", "dims", "timing")


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
    return cells


def decode_cells(cells: Mapping[str, bytes]) -> dict[str, Any]:
    """The inverse of ``encode_cells``: a ``metric_latest``-shaped dict."""
    out: dict[str, Any] = {c: cells[c].decode("utf-8") for c in _TEXT_COLUMNS}
    out.update({c: struct.unpack(">q", cells[c])[0] for c in _INT_COLUMNS})
    out.update({c: datetime.fromisoformat(cells[c].decode("ascii"))
                for c in _TIME_COLUMNS})
    out["is_final"] = cells["is_final"] == b"\x01"
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


class WriteChangelogToBigtable(beam.PTransform):
    """Changelog row dicts -> one Bigtable row per (metric, granularity, dims, window).

    Skips retractions (sign -1); writes each +1 row with cell timestamps from its
    revision, so the newest cell is the latest revision and replays are overwrites.
    The table must exist (``ensure_table``) before the pipeline runs.
    """

    def __init__(self, project: str, instance: str, table: str,
                 flush_count: int | None = None):
        super().__init__()
        self.project, self.instance, self.table = project, instance, table
        self.flush_count = flush_count

    def expand(self, rows):
        kwargs = {} if self.flush_count is None else {"flush_count": self.flush_count}
        return (
            rows
            | "SkipRetractions" >> beam.Filter(lambda r: int(r["sign"]) > 0)
            | "ToDirectRow" >> beam.Map(to_direct_row)
            | "WriteToBigTable" >> WriteToBigTable(
                project_id=self.project, instance_id=self.instance,
                table_id=self.table, **kwargs))


def _dims_str(dims: str | Mapping[str, Any]) -> str:
    return dims if isinstance(dims, str) else schemas.canonical_dims(dims)


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

    dims = _dims_str(dims)
    prefix = series_prefix(metric, granularity, dims)
    start_key = prefix + (_window_token(start).encode("ascii") if start else b"")
    end_key = (prefix + _window_token(end).encode("ascii")) if end else \
        prefix[:-1] + bytes([prefix[-1] + 1])
    tbl = _table(project, instance, table)
    out = []
    for row in tbl.read_rows(start_key=start_key, end_key=end_key,
                             filter_=CellsColumnLimitFilter(1)):
        cells = {col.decode("ascii"): cell_list[0].value
                 for col, cell_list in row.cells.get(FAMILY, {}).items()}
        decoded = decode_cells(cells)
        if decoded["dims"] != dims:  # a hash collision: not this series
            continue
        if end is not None and decoded["window_start"] >= end:
            continue
        out.append(decoded)
    out.sort(key=lambda r: r["window_start"])
    return out


def read_all_rows(project: str, instance: str, table: str) -> Iterable[dict[str, Any]]:
    """Every row of the table (newest cell per column), for tests and small tables."""
    from google.cloud.bigtable.row_filters import CellsColumnLimitFilter

    for row in _table(project, instance, table).read_rows(
            filter_=CellsColumnLimitFilter(1)):
        cells = {col.decode("ascii"): cell_list[0].value
                 for col, cell_list in row.cells.get(FAMILY, {}).items()}
        yield dict(decode_cells(cells), row_key=row.row_key.decode("utf-8"))
