"""The BigQuery sink against a real local BigQuery REST server (local-bigquery 0.3.2).

Nothing is mocked: Beam's BigQueryWriteFn talks to the server through
``LocalBigQueryTestClient`` (tests/servers.py), the only hook WriteToBigQuery's code has.
The server honours insertId for 60 s (in its process memory, like BigQuery's best-effort
window), rejects invalid rows per row, and keeps its tables in its data dir across a
restart.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import oracle
from pipeline.compare import differences
from pipeline.generator import GeneratorConfig, write_dataset
from pipeline.graph import ClickstreamMetrics
from pipeline.job import build, counters_of
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.changelog_samples import CHANGELOG, CLICK, T0, VIEW, row
from tests.fixtures_servers import bigquery_server  # noqa: F401  (fixture)
from transforms import sink_bigquery
from transforms.sink_bigquery import (
    INSERT_FAILED_REASON,
    WriteChangelogToBigQuery,
    read_series_from_bigquery,
)
from transforms.sources import ReadEventFiles

PROJECT = "local"
EVENTS = 6_000
KEY = "metric, dims, granularity, window_start"


DEAD_LETTERS = [{
    "dead_letter_id": "abc-0", "payload": b"\xff{not json", "reason": "malformed_json",
    "detail": "Expecting value", "ingest_time": T0,
}]


# --- helpers --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bq(bigquery_server) -> servers.LocalBigQueryTestClient:  # noqa: F811
    return servers.LocalBigQueryTestClient(bigquery_server, PROJECT)


def query(client: Any, sql: str) -> list[dict[str, Any]]:
    return [dict(r.items()) for r in client.query(sql).result()]


def count(client: Any, dataset: str, table: str, where: str = "TRUE") -> int:
    return query(client, f"SELECT count(*) AS n FROM `{PROJECT}.{dataset}.{table}` "
                         f"WHERE {where}")[0]["n"]


def doubled_keys(client: Any, dataset: str) -> list[dict[str, Any]]:
    """Changelog keys stored more than once: what insert ids must prevent."""
    return query(client, f"SELECT {KEY}, revision, sign, count(*) AS n "
                         f"FROM `{PROJECT}.{dataset}.metric_changelog` "
                         f"GROUP BY {KEY}, revision, sign HAVING count(*) > 1")


def invariant_mismatches(client: Any, dataset: str) -> list[dict[str, Any]]:
    """Windows whose changelog does not sum (sign × value) to the view's value."""
    return query(client, f"""
        SELECT l.metric, l.dims, l.granularity, l.window_start, c.total, l.value
        FROM `{PROJECT}.{dataset}.metric_latest` l
        FULL OUTER JOIN (
          SELECT {KEY}, sum(sign * value) AS total
          FROM `{PROJECT}.{dataset}.metric_changelog` GROUP BY {KEY}) c
        USING ({KEY})
        WHERE c.total IS NULL OR l.value IS NULL OR c.total != l.value""")


def latest_from_bigquery(client: Any, dataset: str) -> dict[oracle.MetricKey, int]:
    rows = query(client, f"SELECT {KEY}, value FROM `{PROJECT}.{dataset}.metric_latest`")
    return {(r["metric"], r["dims"], r["granularity"],
             r["window_start"].astimezone(UTC).isoformat()): r["value"] for r in rows}


def write_rows(client: Any, dataset: str, changelog: list[dict], dead: list[dict],
               batch_size: int = 500) -> dict[str, int]:
    p = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"]))
    outputs = (p | "Changelog" >> beam.Create(changelog),
               p | "DeadLetters" >> beam.Create(dead))
    _ = outputs | WriteChangelogToBigQuery(PROJECT, dataset, batch_size=batch_size,
                                           test_client=client)
    result = p.run()
    result.wait_until_finish()
    return counters_of(result)


# --- a small changelog ------------------------------------------------------------------

@pytest.mark.integration
def test_view_holds_the_highest_revision_and_read_series_matches_bigtables_shape(bq):
    counters = write_rows(bq, "small", CHANGELOG, DEAD_LETTERS, batch_size=4)
    assert counters["bigquery_rows.metric_changelog"] == len(CHANGELOG)
    assert counters.get(f"{INSERT_FAILED_REASON}.metric_changelog", 0) == 0
    # the replayed revision carried the same insert id: stored once
    assert count(bq, "small", "metric_changelog") == len(CHANGELOG) - 1
    assert doubled_keys(bq, "small") == []
    assert count(bq, "small", "metric_latest") == 5
    assert invariant_mismatches(bq, "small") == []

    series = read_series_from_bigquery(PROJECT, "small", "metric_latest", "events", "hour",
                                       {"event_type": "click"}, client=bq)
    assert [(r["window_start"], r["value"], r["revision"], r["timing"], r["is_final"])
            for r in series] == [
        (T0, 11, 3, "LATE", True),
        (T0 + timedelta(hours=1), 3, 1, "EARLY", False),
    ]
    # the same keys as read_series_from_bigtable: metric_latest's columns + pane_index
    assert set(series[0]) == {"metric", "dims", "granularity", "window_start", "window_end",
                              "value", "revision", "pane_index", "timing", "is_final",
                              "emitted_at"}
    assert series[0]["window_end"] == T0 + timedelta(hours=1)
    assert series[0]["emitted_at"] == T0 + timedelta(minutes=3)
    assert (series[0]["dims"], series[0]["pane_index"]) == (CLICK, 2)
    view = read_series_from_bigquery(PROJECT, "small", "metric_latest", "events", "hour",
                                     VIEW, client=bq)
    assert [(r["value"], r["revision"]) for r in view] == [(9, 2)]
    day = read_series_from_bigquery(PROJECT, "small", "metric_latest", "events", "day",
                                    CLICK, client=bq)
    assert [(r["window_start"], r["value"]) for r in day] == [(T0.replace(hour=0), 14)]
    users = read_series_from_bigquery(PROJECT, "small", "metric_latest", "active_users",
                                      "hour", client=bq)
    assert [r["value"] for r in users] == [2]
    only_7 = read_series_from_bigquery(PROJECT, "small", "metric_latest", "events", "hour",
                                       CLICK, start=T0 + timedelta(hours=1), client=bq)
    assert [r["value"] for r in only_7] == [3]
    only_6 = read_series_from_bigquery(PROJECT, "small", "metric_latest", "events", "hour",
                                       CLICK, end=T0 + timedelta(hours=1), client=bq)
    assert [r["value"] for r in only_6] == [11]

    dead = query(bq, "SELECT dead_letter_id, TO_BASE64(payload) AS payload, reason "
                     f"FROM `{PROJECT}.small.dead_letter`")
    assert dead == [{"dead_letter_id": "abc-0", "reason": "malformed_json",
                     "payload": base64.b64encode(b"\xff{not json").decode()}]


@pytest.mark.integration
def test_tables_are_partitioned_and_clustered_and_latest_is_a_view(bq):
    write_rows(bq, "layout", CHANGELOG[:2], [])
    changelog = bq.get_table(f"{PROJECT}.layout.metric_changelog")
    assert changelog.time_partitioning.type_ == "DAY"
    assert changelog.time_partitioning.field == "window_start"
    assert changelog.clustering_fields == ["metric"]
    assert [f.name for f in changelog.schema] == [
        *sink_bigquery.schemas.CHANGELOG_COLUMNS, sink_bigquery.schemas.SKETCH_COLUMN]
    dead = bq.get_table(f"{PROJECT}.layout.dead_letter")
    assert dead.time_partitioning.field == "ingest_time"
    latest = bq.get_table(f"{PROJECT}.layout.metric_latest")
    assert latest.table_type == "VIEW"
    assert "ROW_NUMBER()" in latest.view_query
    # the idempotent helper leaves an existing view alone and creates nothing twice
    sink_bigquery._ENSURED.clear()
    sink_bigquery.ensure_dataset_and_tables(PROJECT, "layout", bq)
    assert {t.table_id for t in bq.list_tables(f"{PROJECT}.layout")} == {
        "metric_changelog", "dead_letter", "metric_latest"}
    # an outdated view definition is brought back to schemas/bigquery_metric_latest.sql
    latest.view_query = f"SELECT metric FROM `{PROJECT}.layout.metric_changelog`"
    bq.update_table(latest, ["view_query"])
    assert "ROW_NUMBER()" not in bq.get_table(f"{PROJECT}.layout.metric_latest").view_query
    sink_bigquery._ENSURED.clear()
    sink_bigquery.ensure_dataset_and_tables(PROJECT, "layout", bq)
    assert bq.get_table(f"{PROJECT}.layout.metric_latest").view_query.strip() == (
        sink_bigquery.latest_view_sql(PROJECT, "layout").strip())
    assert count(bq, "layout", "metric_latest") == 1


@pytest.mark.integration
def test_a_row_bigquery_refuses_goes_to_the_dead_letter_with_its_reason(bq):
    bad = row(CLICK, T0 + timedelta(hours=5), 4, +1, 1)
    bad["timing"] = None  # REQUIRED in the table: the server refuses this row only
    counters = write_rows(bq, "refused", [*CHANGELOG[:3], bad], [], batch_size=10)
    assert counters[f"{INSERT_FAILED_REASON}.metric_changelog"] == 1
    assert count(bq, "refused", "metric_changelog") == 3  # the valid rows of the batch
    dead = query(bq, "SELECT dead_letter_id, reason, detail, "
                     f"SAFE_CONVERT_BYTES_TO_STRING(payload) AS payload "
                     f"FROM `{PROJECT}.refused.dead_letter`")
    assert len(dead) == 1
    assert dead[0]["reason"] == INSERT_FAILED_REASON
    assert dead[0]["dead_letter_id"].startswith(INSERT_FAILED_REASON)
    detail = json.loads(dead[0]["detail"])
    assert detail["table"] == "metric_changelog"
    assert "timing" in json.dumps(detail["errors"])
    payload = json.loads(dead[0]["payload"])
    assert payload["timing"] is None and payload["window_start"].startswith("2026-11-28T11")

    # replaying the failure gives the same dead letter id: still one row
    write_rows(bq, "refused", [bad], [])
    assert count(bq, "refused", "dead_letter") == 1


# --- generated events through the whole graph ------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("generated"))
    write_dataset(out, GeneratorConfig(events=EVENTS, seed=23))
    return out


def expected(dataset: str) -> dict:
    with open(os.path.join(dataset, "expected.json")) as f:
        return json.load(f)


def run_job(dataset: str, out: Path, bq: Any, bq_dataset: str) -> dict[str, int]:
    """The job's own graph (pipeline.job.build) with --bigquery_* flags."""
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--input_files", os.path.join(dataset, "events-*.jsonl"),
            "--duckdb_path", str(out / "out.duckdb"), "--bigquery_project", PROJECT,
            "--bigquery_dataset", bq_dataset]
    options = PipelineOptions(argv)
    p = beam.Pipeline(options=options)
    build(p, options.view_as(ClickstreamOptions), bigquery_test_client=bq)
    result = p.run()
    result.wait_until_finish()
    return counters_of(result)


@pytest.fixture(scope="module")
def job_run(dataset, bq, tmp_path_factory) -> tuple[dict[str, int], float]:
    counters = run_job(dataset, tmp_path_factory.mktemp("job"), bq, "job")
    return counters, time.monotonic()


@pytest.mark.integration
def test_job_writes_the_oracles_numbers_to_bigquery(dataset, bq, job_run):
    counters, _ = job_run
    want = oracle.from_json(expected(dataset)["metrics"])
    assert len(want) > 200
    assert differences(latest_from_bigquery(bq, "job"), want) == []
    assert count(bq, "job", "metric_latest", "NOT is_final") == 0
    assert counters["bigquery_rows.metric_changelog"] == count(bq, "job", "metric_changelog")
    assert counters.get(f"{INSERT_FAILED_REASON}.metric_changelog", 0) == 0


@pytest.mark.integration
def test_changelog_sums_to_the_view_and_has_no_doubles(bq, job_run):
    assert count(bq, "job", "metric_changelog", "sign < 0") > 0  # retractions are there
    assert doubled_keys(bq, "job") == []
    assert invariant_mismatches(bq, "job") == []


@pytest.mark.integration
def test_dead_letters_reach_bigquery_by_reason(dataset, bq, job_run):
    rows = query(bq, f"SELECT reason, count(*) AS n FROM `{PROJECT}.job.dead_letter` "
                     "GROUP BY reason")
    assert {r["reason"]: r["n"] for r in rows} == expected(dataset)["counts"][
        "dead_letter_by_reason"]


@pytest.mark.integration
def test_rerunning_the_same_input_does_not_double_rows(dataset, bq, job_run, tmp_path):
    _, first_done = job_run
    before = {t: count(bq, "job", t) for t in ("metric_changelog", "dead_letter")}
    run_job(dataset, tmp_path, bq, "job")
    # The server forgets an insertId after 60 s, as BigQuery does after about a minute:
    # past that a re-run is expected to double (see the next test), so this test only
    # means something if the second run's inserts came within the window.
    assert time.monotonic() - first_done < 55, "re-run too slow to test insert ids here"
    assert {t: count(bq, "job", t) for t in before} == before
    assert doubled_keys(bq, "job") == []


@pytest.mark.integration
def test_view_stays_exact_when_a_rerun_falls_outside_the_insert_id_window(
        dataset, bq, tmp_path):
    """A restart makes the server forget its insert ids, as time does in BigQuery: the raw
    changelog then holds each row twice, and metric_latest must still be exact."""
    data_dir, port = str(tmp_path / "bq-data"), servers.free_port()
    with servers.bigquery_server(install=False, data_dir=data_dir, port=port) as address:
        client = servers.LocalBigQueryTestClient(address, PROJECT)
        run_job(dataset, tmp_path / "a", client, "forgot")
        rows = count(client, "forgot", "metric_changelog")
    with servers.bigquery_server(install=False, data_dir=data_dir, port=port) as address:
        client = servers.LocalBigQueryTestClient(address, PROJECT)
        assert count(client, "forgot", "metric_changelog") == rows  # data survived
        run_job(dataset, tmp_path / "b", client, "forgot")
        assert count(client, "forgot", "metric_changelog") == 2 * rows
        want = oracle.from_json(expected(dataset)["metrics"])
        assert differences(latest_from_bigquery(client, "forgot"), want) == []


# --- a fault: the server stops mid-write and comes back --------------------------------

class _Retries(logging.Handler):
    """Counts google-api-core's "Retrying due to ..." records (its backoff loop)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def retries() -> Iterator[_Retries]:
    handler = _Retries()
    logger = logging.getLogger("google.api_core.retry")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.integration
def test_server_stopped_mid_write_is_retried_with_backoff_without_doubles_or_gaps(
        dataset, tmp_path, retries):
    data_dir, port = str(tmp_path / "bq-data"), servers.free_port()
    address = f"127.0.0.1:{port}"
    client = servers.LocalBigQueryTestClient(address, PROJECT)
    outcome: dict[str, Any] = {}

    def run() -> None:
        # The job's stages with the sink given small batches: many insert requests, so
        # the server can be stopped between two of them.
        options = PipelineOptions(["--input_files", os.path.join(dataset, "events-*.jsonl")])
        clickstream = options.view_as(ClickstreamOptions)
        p = beam.Pipeline(options=options)
        outputs = (p | ReadEventFiles(clickstream.input_files)
                   | ClickstreamMetrics(clickstream.metrics_config().for_bounded_input(),
                                        clickstream.dedup_buckets))
        _ = outputs | WriteChangelogToBigQuery(PROJECT, "fault", batch_size=5,
                                               test_client=client)
        try:
            result = p.run()
            result.wait_until_finish()
            outcome["counters"] = counters_of(result)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    server = servers.bigquery_server(install=False, data_dir=data_dir, port=port)
    server.__enter__()
    restarted = None
    try:
        job = threading.Thread(target=run, daemon=True)
        job.start()
        deadline = time.monotonic() + 600
        rows_at_stop = 0
        while rows_at_stop == 0:
            assert job.is_alive(), f"job ended before any row was written: {outcome}"
            assert time.monotonic() < deadline, "no row reached the server"
            time.sleep(0.2)
            try:
                rows_at_stop = count(client, "fault", "metric_changelog")
            except Exception:  # dataset or table not created yet
                rows_at_stop = 0
        server.__exit__(None, None, None)  # SIGTERM by PID, waits for the exit
        server = None
        stopped_at = time.monotonic()
        time.sleep(2.0)
        assert job.is_alive(), f"the job did not wait for the server: {outcome}"
        restarted = servers.bigquery_server(install=False, data_dir=data_dir, port=port)
        restarted.__enter__()
        down_s = time.monotonic() - stopped_at
        job.join(timeout=600)
        assert not job.is_alive(), "job still running 10 min after the restart"
        assert "error" not in outcome, outcome.get("error")

        counters = outcome["counters"]
        total = count(client, "fault", "metric_changelog")
        assert 0 < rows_at_stop < total, "the server was not stopped mid-write"
        assert any("Retrying due to" in m for m in retries.messages), (
            f"no retry logged while the server was down for {down_s:.0f} s")
        assert counters["bigquery_rows.metric_changelog"] == total  # no gaps
        assert counters.get(f"{INSERT_FAILED_REASON}.metric_changelog", 0) == 0
        assert doubled_keys(client, "fault") == []  # no doubles
        assert invariant_mismatches(client, "fault") == []
        want = oracle.from_json(expected(dataset)["metrics"])
        assert differences(latest_from_bigquery(client, "fault"), want) == []
        assert {r["reason"]: r["n"] for r in query(
            client, f"SELECT reason, count(*) AS n FROM `{PROJECT}.fault.dead_letter` "
                    "GROUP BY reason")} == expected(dataset)["counts"]["dead_letter_by_reason"]
    finally:
        for cm in (server, restarted):
            if cm is not None:
                cm.__exit__(None, None, None)


@pytest.mark.integration
def test_a_dead_letter_bigquery_refuses_fails_the_job_instead_of_vanishing(bq):
    bad = dict(DEAD_LETTERS[0], dead_letter_id="bad-0", reason=None)  # reason is REQUIRED
    with pytest.raises(Exception, match="refused dead letter bad-0"):
        write_rows(bq, "refused_dead", [], [bad])


# --- flags ------------------------------------------------------------------------------

def _target(*argv: str) -> tuple[str, str] | None:
    return PipelineOptions(list(argv)).view_as(ClickstreamOptions).bigquery_target()


def test_bigquery_flags_turn_the_sink_on_and_refuse_half_a_target():
    assert _target() is None  # the default: DuckDB only
    assert _target("--bigquery_project=p-123456", "--bigquery_dataset=d") == ("p-123456", "d")
    assert _target("--project=job-proj", "--bigquery_dataset=d") == ("job-proj", "d")
    with pytest.raises(SystemExit, match="bigquery_dataset"):
        _target("--bigquery_project=p-123456")
    with pytest.raises(SystemExit, match="--project"):
        _target("--bigquery_dataset=d")


def test_the_job_graph_has_the_bigquery_sink_only_when_asked(tmp_path):
    def labels(*extra: str) -> set[str]:
        options = PipelineOptions(["--input_files", str(tmp_path / "*.jsonl"), *extra])
        p = beam.Pipeline(options=options)
        build(p, options.view_as(ClickstreamOptions))
        return {t.full_label for t in p.transforms_stack[0].parts}

    assert "WriteBigQuery" not in labels()
    assert {"WriteDuckDB", "WriteBigQuery"} <= labels("--bigquery_project=p-123456",
                                                      "--bigquery_dataset=d")


def test_flex_template_regexes_accept_real_bigquery_names():
    params = {p["name"]: p for p in json.loads(
        (Path(__file__).resolve().parents[1] / "templates" / "metadata.json").read_text()
    )["parameters"]}

    def ok(name: str, value: str) -> bool:
        return all(re.fullmatch(rx, value) for rx in params[name]["regexes"])

    for good in ("", "my-project-123", "example.com:my-project"):
        assert ok("bigquery_project", good), good
    for bad in ("My_Project", "p", "-project", "project-", "a b"):
        assert not ok("bigquery_project", bad), bad
    for good in ("", "clickstream", "Click_Stream_2"):
        assert ok("bigquery_dataset", good), good
    for bad in ("click-stream", "a.b", "x y"):
        assert not ok("bigquery_dataset", bad), bad
