"""BigQuery sink: the append-only changelog, a latest view, and dead letters.

Input: changelog rows (``schemas.ChangelogRow`` dicts, tz-aware UTC datetimes) and dead
letter rows (``schemas.DeadLetterRow``). Tables and the view are defined in
``schemas/bigquery.json`` and ``schemas/bigquery_metric_latest.sql``:

- ``metric_changelog``: every row the retract stage emits (+1 new value, -1 retraction),
  partitioned by DAY on window_start (a dashboard or a finalize job reads a few days),
  clustered by metric (most reads filter one metric).
- ``dead_letter``: refused input records, plus changelog rows BigQuery refused (reason
  ``bigquery_insert_failed``, the row as JSON in payload, the errors in detail).
- ``metric_latest``: a VIEW over the changelog picking the highest revision per (metric,
  dims, granularity, window_start).

Why a view and not a table kept by MERGE: streaming inserts are append-only, so a latest
table would need a MERGE (DML) after every pane. DML is quota-limited per table, costs a
scan per statement, and cannot touch rows still in the streaming buffer, so the table
would lag the changelog and need its own retry and ordering logic (an older pane's MERGE
must not overwrite a newer one). A view is always consistent with the changelog (it *is*
the changelog, read one way), needs no DML and no quota, and inherits the partition
pruning: window_start is in its PARTITION BY, so a filter on it prunes day partitions.
Its cost is a window function per read over the filtered partitions; a dashboard that
reads often should read Bigtable (transforms/sink_bigtable.py), which is built for that.

Insert ids: BigQuery drops a streamed row whose insertId it has seen recently, so a retried
insert must carry the same id as the first attempt. Beam's ``WriteToBigQuery`` with
STREAMING_INSERTS cannot do that for us: ``_StreamToBigQuery.InsertIdPrefixFn`` gives every
row ``<random uuid per bundle>-<n>`` and then reshuffles so that retries after the
shuffle reuse them; a re-run, or a retry of the bundle before the shuffle, gets new ids,
and there is no hook for user ids (apache/beam#18044, open). So this module drives the
DoFn ``WriteToBigQuery`` itself uses, ``BigQueryWriteFn``, which takes ``(destination,
(row, insert_id))`` elements: the same batching, CREATE_IF_NEEDED (with
``additional_bq_parameters`` for partitioning and clustering), per-row error handling,
retry with backoff and failed-row outputs, with ids derived from the row's identity:
changelog ``sha256(metric, dims, granularity, window_start, revision, sign)``, dead
letter its ``dead_letter_id`` (sha256 of the payload and a counter). No reshuffle is
needed to pin ids: a replayed bundle recomputes the same ones.

BigQuery's insertId de-duplication is best effort and time-bounded (about a minute), so
it covers retries, not a re-run of the same input hours later. The view picks one row per
key, so metric_latest stays exact even then; a consumer summing the raw changelog should
de-duplicate on (metric, dims, granularity, window_start, revision, sign), the row key.

Retries: connection failures and 5xx answers are retried with exponential backoff inside
the client (google-cloud-bigquery's default retry, up to 10 minutes), transient per-row
errors by ``BigQueryWriteFn`` (``RETRY_ON_TRANSIENT_ERROR``, fuzzed exponential backoff).
Rows refused as invalid are not retried: they go to ``dead_letter`` and are counted
(``bigquery_insert_failed.<table>``). A dead letter BigQuery refuses has nowhere left to
go, so it fails the bundle (and the job, if it keeps failing) rather than vanish.

Depends on Beam (``apache_beam.io.gcp.bigquery``), google-cloud-bigquery and ``schemas``
only. ``test_client``: a picklable object Beam's ``BigQueryWrapper(client=...)`` accepts
(apitools services and ``insert_rows_json``), used to reach a local server in tests;
production leaves it None and uses the worker's default credentials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigquery import BigQueryDisposition, BigQueryWriteFn
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.metrics import Metrics
from apache_beam.utils import retry

import schemas
from schemas import METRICS_NAMESPACE

log = logging.getLogger(__name__)

CHANGELOG_TABLE = "metric_changelog"
DEAD_LETTER_TABLE = "dead_letter"
LATEST_VIEW = "metric_latest"
INSERT_FAILED_REASON = "bigquery_insert_failed"
# Rows per insertAll request: BigQuery recommends ~500; the tests pass fewer to make many
# requests (so a server can be stopped between two of them).
DEFAULT_BATCH_SIZE = 500

_SPEC = json.loads(schemas.read_text("bigquery.json"))
# (project, dataset, client endpoint) already checked in this process: workers run many
# DoFn instances, and the tables and view only need creating once.
_ENSURED: set[tuple[str, str, str]] = set()


def table_schema(table: str) -> dict[str, Any]:
    """The ``{"fields": [...]}`` schema of a table of schemas/bigquery.json."""
    return _SPEC["tables"][table]["schema"]


def create_parameters(table: str) -> dict[str, Any]:
    """Table resource fields besides the schema (partitioning, clustering, description),
    for ``BigQueryWriteFn(additional_bq_parameters=...)``. Plain dicts, as Beam documents
    them: apitools' ``bigquery.Table(**params)`` converts them, and apitools messages
    with repeated fields (Clustering) do not pickle."""
    spec = _SPEC["tables"][table]
    return {k: spec[k] for k in ("description", "timePartitioning", "clustering")
            if k in spec}


def latest_view_sql(project: str, dataset: str) -> str:
    """The metric_latest view's query for a dataset."""
    query = schemas.read_text(_SPEC["views"][LATEST_VIEW]["query_file"])
    return query.replace("{changelog}", f"`{project}.{dataset}.{CHANGELOG_TABLE}`")


def destination(project: str, dataset: str, table: str) -> str:
    return f"{project}:{dataset}.{table}"


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def changelog_insert_id(row: Mapping[str, Any]) -> str:
    """The insertId of a changelog row: a hash of its key, the same on every attempt."""
    key = schemas.changelog_key(row)
    text = json.dumps([key[0], key[1], key[2], _ts(key[3]), int(key[4]), int(key[5])],
                      separators=(",", ":"), ensure_ascii=False)
    return "cl-" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def changelog_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A changelog row as insertAll JSON (timestamps as ISO-8601 UTC strings)."""
    out = {c: row[c] for c in schemas.CHANGELOG_COLUMNS}
    for c in ("window_start", "window_end", "emitted_at"):
        out[c] = _ts(row[c])
    for c in ("value", "sign", "revision", "pane_index"):
        out[c] = int(row[c])
    out["is_final"] = bool(row["is_final"])
    if row.get(schemas.SKETCH_COLUMN) is not None:  # BYTES are base64 in JSON
        out[schemas.SKETCH_COLUMN] = base64.b64encode(row[schemas.SKETCH_COLUMN]).decode()
    return out


def dead_letter_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A dead-letter row as insertAll JSON (BYTES are base64 in JSON)."""
    return {
        "dead_letter_id": row["dead_letter_id"],
        "payload": base64.b64encode(bytes(row["payload"])).decode("ascii"),
        "reason": row["reason"],
        "detail": row["detail"],
        "ingest_time": _ts(row["ingest_time"]),
    }


def failed_insert_dead_letter(table: str, row: Mapping[str, Any], errors: Any,
                              ingest_time: datetime | None = None) -> dict[str, Any]:
    """A dead_letter row (schemas.DeadLetterRow) for a row BigQuery refused.

    Its id is a hash of the table and the row, so a replayed failure is one dead letter.
    """
    payload = json.dumps(row, sort_keys=True, separators=(",", ":"), default=str,
                         ensure_ascii=False).encode("utf-8")
    digest = hashlib.sha256(table.encode("utf-8") + b"\n" + payload).hexdigest()
    return {
        "dead_letter_id": f"{INSERT_FAILED_REASON}-{digest}",
        "payload": payload,
        "reason": INSERT_FAILED_REASON,
        "detail": json.dumps({"table": table, "errors": errors}, default=str,
                             ensure_ascii=False),
        "ingest_time": ingest_time or datetime.now(UTC),
    }


# --- tables and the view --------------------------------------------------------------

def _wrapper(test_client: Any = None):
    from apache_beam.io.gcp.bigquery_tools import BigQueryWrapper
    return BigQueryWrapper(client=test_client)


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status_code", None)


@retry.with_exponential_backoff(
    num_retries=8, initial_delay_secs=1.0,
    retry_filter=retry.retry_on_server_errors_timeout_or_quota_issues_filter)
def ensure_dataset_and_tables(project: str, dataset: str, test_client: Any = None) -> None:
    """Create the dataset, both tables and the metric_latest view where missing.

    Idempotent and safe to race (a 409 from a concurrent creator is fine). A view whose
    query differs from schemas/ is updated, so a changed definition reaches old datasets.
    Retried with backoff: a worker may start while the server is briefly unreachable.
    """
    from apache_beam.io.gcp.bigquery_tools import parse_table_schema_from_json
    from apache_beam.io.gcp.internal.clients import bigquery as bq_api
    from apitools.base.py.exceptions import HttpError

    key = (project, dataset, getattr(test_client, "endpoint", ""))
    if key in _ENSURED:
        return
    wrapper = _wrapper(test_client)
    client = wrapper.client
    try:
        client.datasets.Get(bq_api.BigqueryDatasetsGetRequest(
            projectId=project, datasetId=dataset))
    except HttpError as exc:
        if _status(exc) != 404:
            raise
        try:
            client.datasets.Insert(bq_api.BigqueryDatasetsInsertRequest(
                projectId=project, dataset=bq_api.Dataset(
                    datasetReference=bq_api.DatasetReference(
                        projectId=project, datasetId=dataset))))
        except HttpError as exc2:
            if _status(exc2) != 409:
                raise
    for table in (CHANGELOG_TABLE, DEAD_LETTER_TABLE):
        wrapper.get_or_create_table(
            project, dataset, table,
            parse_table_schema_from_json(json.dumps(table_schema(table))),
            BigQueryDisposition.CREATE_IF_NEEDED, BigQueryDisposition.WRITE_APPEND,
            additional_create_parameters=create_parameters(table))
    _ensure_view(client, project, dataset)
    _ENSURED.add(key)


def _ensure_view(client: Any, project: str, dataset: str) -> None:
    from apache_beam.io.gcp.internal.clients import bigquery as bq_api
    from apitools.base.py.exceptions import HttpError

    query = latest_view_sql(project, dataset)
    description = _SPEC["views"][LATEST_VIEW]["description"]
    ref = bq_api.TableReference(projectId=project, datasetId=dataset, tableId=LATEST_VIEW)
    view = bq_api.Table(tableReference=ref, description=description,
                        view=bq_api.ViewDefinition(query=query, useLegacySql=False))
    try:
        found = client.tables.Get(bq_api.BigqueryTablesGetRequest(
            projectId=project, datasetId=dataset, tableId=LATEST_VIEW))
    except HttpError as exc:
        if _status(exc) != 404:
            raise
        try:
            client.tables.Insert(bq_api.BigqueryTablesInsertRequest(
                projectId=project, datasetId=dataset, table=view))
        except HttpError as exc2:
            if _status(exc2) != 409:
                raise
        return
    if found.view is None or found.view.query.strip() != query.strip():
        client.tables.Update(bq_api.BigqueryTablesUpdateRequest(
            projectId=project, datasetId=dataset, tableId=LATEST_VIEW, table=view))


# --- the write --------------------------------------------------------------------------

class _KeyForInsertFn(beam.DoFn):
    """Row dict -> (destination, (insert JSON, insert id)), the input of BigQueryWriteFn.

    Its setup creates the dataset, tables and view: it runs before any row of the fused
    stage reaches the writer, and also when a stage has no rows at all.
    """

    def __init__(self, project: str, dataset: str, table: str, test_client: Any) -> None:
        self._project, self._dataset, self._table = project, dataset, table
        self._test_client = test_client
        self._destination = destination(project, dataset, table)
        self._sent = Metrics.counter(METRICS_NAMESPACE, f"bigquery_rows.{table}")

    def setup(self) -> None:
        ensure_dataset_and_tables(self._project, self._dataset, self._test_client)

    def process(self, row: Mapping[str, Any]):
        if self._table == CHANGELOG_TABLE:
            item = (changelog_json(row), changelog_insert_id(row))
        else:
            item = (dead_letter_json(row), "dl-" + str(row["dead_letter_id"]))
        self._sent.inc()
        yield self._destination, item


class _FailedToDeadLetterFn(beam.DoFn):
    """(destination, row, errors) from BigQueryWriteFn -> a counted dead_letter row."""

    def __init__(self, table: str) -> None:
        self._table = table
        self._failed = Metrics.counter(METRICS_NAMESPACE,
                                       f"{INSERT_FAILED_REASON}.{table}")

    def process(self, failed: tuple[str, dict, Any]):
        dest, row, errors = failed
        self._failed.inc()
        log.error("BigQuery refused a row of %s (sent to dead_letter): %s", dest, errors)
        yield failed_insert_dead_letter(self._table, row, errors)


class _RefusedDeadLetterFn(beam.DoFn):
    """A dead letter BigQuery refused: count it and fail, so it cannot vanish."""

    def __init__(self) -> None:
        self._failed = Metrics.counter(METRICS_NAMESPACE,
                                       f"{INSERT_FAILED_REASON}.{DEAD_LETTER_TABLE}")

    def process(self, failed: tuple[str, dict, Any]):
        dest, row, errors = failed
        self._failed.inc()
        raise RuntimeError(f"BigQuery refused dead letter {row.get('dead_letter_id')} "
                           f"for {dest}: {errors}")


def _write_fn(table: str, batch_size: int, test_client: Any) -> BigQueryWriteFn:
    return BigQueryWriteFn(
        batch_size=batch_size,
        schema=table_schema(table),
        create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
        write_disposition=BigQueryDisposition.WRITE_APPEND,
        test_client=test_client,
        # Invalid rows are final: retrying them would block the pipeline forever
        # (RETRY_ALWAYS, Beam's default); they go to dead_letter instead.
        retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
        additional_bq_parameters=create_parameters(table),
        ignore_insert_ids=False)


class WriteChangelogToBigQuery(beam.PTransform):
    """(changelog rows, dead-letter rows) -> metric_changelog, dead_letter (+ the view).

    Streaming inserts with insert ids derived from each row's key (module docstring).
    Changelog rows BigQuery refuses become dead letters with reason
    ``bigquery_insert_failed``; counters ``bigquery_rows.<table>`` (rows sent) and
    ``bigquery_insert_failed.<table>`` (rows refused) in namespace ``clickstream``.
    """

    def __init__(self, project: str, dataset: str, batch_size: int = DEFAULT_BATCH_SIZE,
                 test_client: Any = None) -> None:
        super().__init__()
        if not project or not dataset:
            raise ValueError("WriteChangelogToBigQuery needs a project and a dataset")
        self.project, self.dataset = project, dataset
        self.batch_size = batch_size
        self.test_client = test_client

    def _insert(self, rows: beam.PCollection, table: str, label: str):
        return (
            rows
            | f"{label}InsertIds" >> beam.ParDo(_KeyForInsertFn(
                self.project, self.dataset, table, self.test_client))
            | f"{label}StreamInsert" >> beam.ParDo(
                _write_fn(table, self.batch_size, self.test_client)).with_outputs(
                    BigQueryWriteFn.FAILED_ROWS, BigQueryWriteFn.FAILED_ROWS_WITH_ERRORS,
                    main="main"))

    def expand(self, outputs: tuple[beam.PCollection, beam.PCollection]) -> beam.pvalue.PDone:
        changelog, dead_letters = outputs
        written = self._insert(changelog, CHANGELOG_TABLE, "Changelog")
        refused = (written[BigQueryWriteFn.FAILED_ROWS_WITH_ERRORS]
                   | "RefusedToDeadLetter" >> beam.ParDo(
                       _FailedToDeadLetterFn(CHANGELOG_TABLE)))
        all_dead = (dead_letters, refused) | "AllDeadLetters" >> beam.Flatten()
        dead_written = self._insert(all_dead, DEAD_LETTER_TABLE, "DeadLetter")
        _ = (dead_written[BigQueryWriteFn.FAILED_ROWS_WITH_ERRORS]
             | "FailOnRefusedDeadLetter" >> beam.ParDo(_RefusedDeadLetterFn()))
        return beam.pvalue.PDone(changelog.pipeline)


# --- reading ---------------------------------------------------------------------------

def _client(project: str, client: Any):
    if client is not None:
        return client
    from google.cloud import bigquery
    return bigquery.Client(project=project)


def read_series_from_bigquery(
        project: str, dataset: str, table: str, metric: str, granularity: str,
        dims: str | Mapping[str, Any] = "{}",
        start: datetime | None = None, end: datetime | None = None,
        *, client: Any = None,
) -> list[dict[str, Any]]:
    """One metric's series for one dims value from the latest view, oldest window first.

    The same signature and dict shape as ``read_series_from_bigtable``: ``table`` is the
    view (``metric_latest``), ``dataset`` stands where Bigtable has the instance;
    ``start`` is inclusive and ``end`` exclusive (window_start bounds, tz-aware). Each
    dict has the ``metric_latest`` columns plus ``pane_index``. ``client``: a
    google-cloud-bigquery client (default: one for ``project`` with default credentials).
    """
    from google.cloud import bigquery

    conditions = ["metric = @metric", "granularity = @granularity", "dims = @dims"]
    params = [bigquery.ScalarQueryParameter("metric", "STRING", metric),
              bigquery.ScalarQueryParameter("granularity", "STRING", granularity),
              bigquery.ScalarQueryParameter("dims", "STRING", schemas.dims_text(dims))]
    if start is not None:
        conditions.append("window_start >= @start")
        params.append(bigquery.ScalarQueryParameter("start", "TIMESTAMP", start))
    if end is not None:
        conditions.append("window_start < @end")
        params.append(bigquery.ScalarQueryParameter("end", "TIMESTAMP", end))
    return _query_latest(project, dataset, table, conditions, params, client)


def read_latest_rows_from_bigquery(project: str, dataset: str, start: datetime,
                                   end: datetime, *, client: Any = None
                                   ) -> list[schemas.ChangelogRow]:
    """What the sink holds for windows starting in [start, end): the latest row per
    key, as the +1 changelog row that a correction retracts (finalize)."""
    from google.cloud import bigquery

    rows = _query_latest(
        project, dataset, LATEST_VIEW, ["window_start >= @start", "window_start < @end"],
        [bigquery.ScalarQueryParameter("start", "TIMESTAMP", start),
         bigquery.ScalarQueryParameter("end", "TIMESTAMP", end)], client)
    return [dict(row, sign=1) for row in rows]  # type: ignore[misc]


def _query_latest(project: str, dataset: str, table: str, conditions: list[str],
                  params: list[Any], client: Any) -> list[dict[str, Any]]:
    """metric_latest rows (plus pane_index) matching `conditions`, oldest window first."""
    from google.cloud import bigquery

    columns = ", ".join((*schemas.LATEST_COLUMNS, "pane_index"))
    sql = (f"SELECT {columns} FROM `{project}.{dataset}.{table}` "
           f"WHERE {' AND '.join(conditions)} ORDER BY window_start")
    job = _client(project, client).query(
        sql, job_config=bigquery.QueryJobConfig(query_parameters=params))
    out = []
    for row in job.result():
        item = dict(row.items())
        for c in ("window_start", "window_end", "emitted_at"):
            item[c] = item[c].astimezone(UTC)
        for c in ("value", "revision", "pane_index"):
            item[c] = int(item[c])
        item["is_final"] = bool(item["is_final"])
        out.append(item)
    return out
