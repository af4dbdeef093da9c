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

Outages and retries. Beam's ``WriteToBigTable`` hands a bundle's rows to the client's
``MutationsBatcher``; the client (google-cloud-bigtable 2.50) retries UNAVAILABLE and
DEADLINE_EXCEEDED itself (backoff from 10 ms doubling to 60 s, 60 s per attempt) for up
to 600 s, silently, and then ``finish_bundle`` raises a bare ``MutationsBatchError``
(measured with the emulator gone: no counter, no log for 596 s, then "Errors in batch
mutations."); the rows of that bundle are gone from the batcher. What happens next
depends on the runner: the FnApiRunner (DirectRunner, batch) does not retry a bundle, it
fails the whole job (measured: one attempt); Dataflow retries a batch work item 4 times
and a streaming one until it succeeds. So the write here is our own DoFn
(``_WriteRowsFn``) on the same client, with DirectRows as before: it keeps the bundle's
rows, sends them with ``Table.mutate_rows`` (the client's own retry bounded to
``call_budget_s``, each attempt to ``attempt_timeout_s``), and resends the rows that
failed with a transient status (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
ABORTED, INTERNAL) after an exponential backoff with jitter (``initial_backoff_s``
doubling to ``max_backoff_s``), counting each resend in the ``bigtable_write_retries``
counter. Resending is safe because every write is an idempotent overwrite (same cells,
same revision timestamps). After ``give_up_after_s`` of failures (15 min by default,
longer than the client's own 10), or at once on a permanent error (NOT_FOUND,
PERMISSION_DENIED, ...), it raises ``BigtableWriteError``, which names the table, the
rows not written and the last error, and says what to do: restore Bigtable and re-run
the same input, which rewrites the same cells and doubles nothing.
tests/test_bigtable_faults.py pauses the emulator (SIGSTOP) mid-write and resumes it:
the resends are counted and the table ends equal to the oracle with no extra cell
versions.

Depends on Beam, google-cloud-bigtable and ``schemas`` only. Against the emulator set
BIGTABLE_EMULATOR_HOST.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import apache_beam as beam
from apache_beam.metrics import Metrics

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


METRICS_NAMESPACE = "clickstream"
log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC status codes worth resending: the server is away, overloaded or timed out. Any
# other code (NOT_FOUND, PERMISSION_DENIED, INVALID_ARGUMENT, ...) will not heal by
# waiting, so it fails the bundle at once.
_TRANSIENT_CODES = frozenset({4, 8, 10, 13, 14})  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
#                                                   ABORTED, INTERNAL, UNAVAILABLE


class BigtableWriteError(RuntimeError):
    """Bigtable writes still failed after the bounded retries, or failed permanently."""


class _Resend(Exception):
    """Some rows failed with a transient status: back off and send them again."""


def _transient(exc: BaseException) -> bool:
    from google.api_core import exceptions

    if isinstance(exc, _Resend | exceptions.RetryError):  # RetryError: client deadline
        return True
    code = getattr(exc, "grpc_status_code", None)
    return code is not None and code.value[0] in _TRANSIENT_CODES


@dataclass(frozen=True)
class BigtableWriteConfig:
    """Where and how the sink writes; small and picklable, shipped with the DoFn."""

    project: str
    instance: str
    table: str
    # 1000 rows per request, as Beam's WriteToBigTable: a request of aggregates is a few
    # hundred KB, far below Bigtable's 100k mutations per request.
    flush_count: int = 1000
    create_table: bool = False
    attempt_timeout_s: float = 20.0  # one RPC attempt
    call_budget_s: float = 60.0      # the client's own fast retries within one call
    initial_backoff_s: float = 1.0   # our backoff between calls, doubling ...
    max_backoff_s: float = 60.0      # ... up to this
    give_up_after_s: float = 900.0   # then BigtableWriteError

    @property
    def path(self) -> str:
        return f"projects/{self.project}/instances/{self.instance}/tables/{self.table}"


class _WriteRowsFn(beam.DoFn):
    """Changelog rows -> Bigtable, resending transient failures with bounded backoff."""

    def __init__(self, config: BigtableWriteConfig) -> None:
        self._config = config
        self._retries = Metrics.counter(METRICS_NAMESPACE, "bigtable_write_retries")
        self._written = Metrics.counter(METRICS_NAMESPACE, "bigtable_rows_written")

    def setup(self) -> None:
        c = self._config
        if c.create_table:
            # Many workers may race here; ensure_table tolerates AlreadyExists.
            self._with_backoff(lambda: ensure_table(c.project, c.instance, c.table),
                               "create the table")
        self._table = _table(c.project, c.instance, c.table)

    def start_bundle(self) -> None:
        self._rows: list[Any] = []

    def process(self, row: Mapping[str, Any]) -> None:
        self._rows.append(to_direct_row(row))
        if len(self._rows) >= self._config.flush_count:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        pending, self._rows = self._rows, []

        def send() -> None:
            nonlocal pending
            failed = self._send(pending)
            if failed:
                status = failed[0][1]
                message = (f"{len(failed)} of {len(pending)} rows failed, e.g. status "
                           f"{status.code}: {status.message}")
                pending = [row for row, _ in failed]
                raise _Resend(message)

        if pending:
            self._with_backoff(send, f"write {len(pending)} rows")

    def _send(self, rows: list[Any]) -> list[tuple[Any, Any]]:
        """One mutate_rows call; returns the (row, status) pairs that failed transiently."""
        from google.cloud.bigtable.table import DEFAULT_RETRY

        c = self._config
        statuses = self._table.mutate_rows(
            rows, retry=DEFAULT_RETRY.with_deadline(c.call_budget_s),
            timeout=c.attempt_timeout_s)
        failed = [(row, st) for row, st in zip(rows, statuses, strict=True) if st.code != 0]
        self._written.inc(len(rows) - len(failed))
        permanent = [st for _, st in failed if st.code not in _TRANSIENT_CODES]
        if permanent:
            raise self._error(f"{len(permanent)} of {len(rows)} rows refused, status "
                              f"{permanent[0].code}: {permanent[0].message}")
        return failed

    def _with_backoff(self, call: Callable[[], T], what: str) -> T:
        c = self._config
        started = time.monotonic()
        delay = c.initial_backoff_s
        attempt = 1
        while True:
            try:
                return call()
            except BigtableWriteError:
                raise
            except Exception as exc:
                waited = time.monotonic() - started
                if not _transient(exc):
                    raise self._error(f"could not {what}: {exc!r}") from exc
                if waited + delay > c.give_up_after_s:
                    raise self._error(f"could not {what} after {attempt} attempts over "
                                      f"{waited:.0f} s; last error: {exc!r}") from exc
                self._retries.inc()
                log.warning("Bigtable %s: %s, attempt %d failed (%r); retrying in ~%.1f s",
                            c.path, what, attempt, exc, delay)
                # Jitter keeps many workers from hammering a recovering server in step.
                time.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, c.max_backoff_s)
                attempt += 1

    def _error(self, what: str) -> BigtableWriteError:
        return BigtableWriteError(
            f"Bigtable {self._config.path}: {what}. Check that the instance is reachable "
            "(BIGTABLE_EMULATOR_HOST for the emulator) and that the job may write to it, "
            "then re-run the same input: every write is an idempotent overwrite (cell "
            "timestamp = revision), so nothing doubles. To ride out longer outages raise "
            "give_up_after_s (WriteChangelogToBigtable).")


class WriteChangelogToBigtable(beam.PTransform):
    """Changelog row dicts -> one Bigtable row per (metric, granularity, dims, window).

    Skips retractions (sign -1); writes each +1 row with cell timestamps from its
    revision, so the newest cell is the latest revision and replays are overwrites.
    With ``create_table`` each worker creates the table when missing (``ensure_table``);
    otherwise it must exist before the pipeline runs. Failed writes are resent with
    exponential backoff for up to ``give_up_after_s`` (see the module docstring); the
    keyword arguments are the fields of ``BigtableWriteConfig``.
    """

    def __init__(self, project: str, instance: str, table: str, **settings: Any):
        super().__init__()
        if settings.get("flush_count") is None:
            settings.pop("flush_count", None)
        self.config = BigtableWriteConfig(project, instance, table, **settings)

    def expand(self, rows):
        return (
            rows
            | "SkipRetractions" >> beam.Filter(lambda r: int(r["sign"]) > 0)
            | "WriteRows" >> beam.ParDo(_WriteRowsFn(self.config)))


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
