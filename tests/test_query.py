"""`clickstream query`: one generated input, run once into DuckDB, Bigtable (the emulator)
and BigQuery (local-bigquery 0.3.2): every series reads back the same from all three
stores, byte for byte, and equals the oracle.

Nothing is faked: the one job run (``pipeline.job.build``, all three sinks in one graph,
so emitted_at is the same everywhere) writes to the real local servers, and the CLI
reads BigQuery through ``--bigquery_endpoint`` like a user pointing it at a local server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import cli, oracle
from pipeline.generator import GeneratorConfig, write_dataset
from pipeline.job import build, counters_of
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.fixtures_servers import bigquery_server, bigtable_emulator  # noqa: F401
from tests.test_cli import clickstream
from transforms.sink_bigquery import INSERT_FAILED_REASON
from transforms.sink_duckdb import read_rows

PROJECT, INSTANCE, TABLE = "test-project", "test-instance", "query_latest"
BQ_PROJECT, BQ_DATASET = "local", "query"  # the server's project (servers.bigquery_server)
STORES = ("duckdb", "bigtable", "bigquery")

# Several metrics, dims shapes and both granularities.
SERIES = [
    ("events", "hour", {"event_type": "page_view"}),
    ("events", "day", {"event_type": "purchase"}),
    ("active_users", "hour", {}),
    ("active_users", "day", {}),
    ("funnel_step", "day", {"name": "checkout", "step": "3"}),
    ("feature_users", "day", {"feature": "search"}),
]


@dataclass(frozen=True)
class Stores:
    db: str  # the DuckDB file
    bigquery: str  # the local BigQuery server's REST endpoint
    want: dict[oracle.MetricKey, int]  # the generator's oracle
    counters: dict[str, int]  # the job run's counters

    def connection(self, store: str) -> list[str]:
        if store == "duckdb":
            return ["--from", "duckdb", "--duckdb_path", self.db]
        if store == "bigtable":
            return ["--from", "bigtable", "--bigtable_project", PROJECT,
                    "--bigtable_instance", INSTANCE, "--bigtable_table", TABLE]
        assert store == "bigquery"
        return ["--from", "bigquery", "--bigquery_project", BQ_PROJECT,
                "--bigquery_dataset", BQ_DATASET, "--bigquery_endpoint", self.bigquery]


@pytest.fixture(scope="module")
def stores(bigtable_emulator, bigquery_server, tmp_path_factory) -> Stores:  # noqa: F811
    data = tmp_path_factory.mktemp("events")
    write_dataset(str(data), GeneratorConfig(events=4000, seed=5))
    db = str(tmp_path_factory.mktemp("db") / "out.duckdb")
    # The job's own graph with all three sinks, run once. The BigQuery sink reaches the
    # local server through build()'s test client (WriteToBigQuery has no endpoint flag).
    options = PipelineOptions([
        "--input_files", str(data / "events-*.jsonl"), "--duckdb_path", db,
        "--bigtable_project", PROJECT, "--bigtable_instance", INSTANCE,
        "--bigtable_table", TABLE,
        "--bigquery_project", BQ_PROJECT, "--bigquery_dataset", BQ_DATASET])
    p = beam.Pipeline(options=options)
    build(p, options.view_as(ClickstreamOptions), bigquery_test_client=(
        servers.LocalBigQueryTestClient(bigquery_server, BQ_PROJECT)))
    result = p.run()
    result.wait_until_finish()
    with open(data / "expected.json") as f:
        want = oracle.from_json(json.load(f)["metrics"])
    return Stores(db, f"http://{bigquery_server}", want, counters_of(result))


def query(capsys, stores: Stores, store: str, *args: str) -> str:
    assert cli.main(["query", *args, *stores.connection(store)]) == 0
    return capsys.readouterr().out


def from_every_store(capsys, stores: Stores, *args: str) -> dict[str, str]:
    return {store: query(capsys, stores, store, *args) for store in STORES}


def series_args(metric: str, granularity: str, dims: dict, fmt: str = "json") -> list[str]:
    return ["--metric", metric, "--granularity", granularity, "--dims", json.dumps(dims),
            "--format", fmt]


@pytest.mark.integration
def test_the_job_wrote_every_revision_to_bigtable_and_bigquery(stores) -> None:
    revisions = read_rows(stores.db, "SELECT count(*) FROM metric_changelog "
                                     "WHERE sign > 0")[0][0]
    changelog = read_rows(stores.db, "SELECT count(*) FROM metric_changelog")[0][0]
    counters = stores.counters
    # Rows handed to WriteToBigTable; the job succeeded, so the client wrote them all
    # (a row it could not write fails the bundle). The table's contents are checked
    # against the oracle and the other stores below.
    assert counters["bigtable_rows_to_write"] == revisions > 0
    assert counters["bigquery_rows.metric_changelog"] == changelog > revisions
    assert counters.get(f"{INSERT_FAILED_REASON}.metric_changelog", 0) == 0


@pytest.mark.integration
@pytest.mark.parametrize(("metric", "granularity", "dims"), SERIES)
def test_all_three_stores_give_the_same_series_equal_to_the_oracle(
        capsys, stores, metric, granularity, dims) -> None:
    out = from_every_store(capsys, stores, *series_args(metric, granularity, dims))
    assert out["bigtable"] == out["duckdb"]
    assert out["bigquery"] == out["duckdb"]

    rows = json.loads(out["duckdb"])
    canonical = json.dumps(dims, sort_keys=True, separators=(",", ":"))
    expected = {w: v for (m, d, g, w), v in stores.want.items()
                if (m, d, g) == (metric, canonical, granularity)}
    assert expected, "the oracle has no such series: the test would prove nothing"
    got = {r["window_start"].replace("Z", "+00:00"): r["value"] for r in rows}
    assert got == expected
    assert [r["window_start"] for r in rows] == sorted(r["window_start"] for r in rows)
    assert all(r["is_final"] and r["revision"] >= 1 for r in rows)


@pytest.mark.integration
def test_time_bounds_and_the_text_format_are_the_same_for_every_store(capsys, stores
                                                                      ) -> None:
    want = stores.want
    hours = sorted(w for (m, d, g, w) in want if (m, g) == ("active_users", "hour"))
    start, end = hours[3], hours[7]
    args = [*series_args("active_users", "hour", {}, fmt="table"), "--start", start,
            "--end", end]
    out = from_every_store(capsys, stores, *args)
    assert out["bigtable"] == out["duckdb"]
    assert out["bigquery"] == out["duckdb"]
    lines = out["duckdb"].splitlines()
    assert lines[0].split() == ["window_start", "window_end", "value", "revision",
                                "timing", "is_final", "emitted_at"]
    assert lines[-1] == "(4 windows)"  # start inclusive, end exclusive
    assert [line.split()[0] for line in lines[1:-1]] == [
        h.replace("+00:00", "Z") for h in hours[3:7]]
    assert [int(line.split()[2]) for line in lines[1:-1]] == [
        want[("active_users", "{}", "hour", h)] for h in hours[3:7]]


@pytest.mark.integration
@pytest.mark.parametrize("store", ["bigtable", "bigquery"])
def test_the_console_script_prints_the_same_table(capsys, stores, store) -> None:
    args = series_args("events", "day", {"event_type": "page_view"}, fmt="table")
    ran = clickstream("query", *args, *stores.connection(store))
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout == query(capsys, stores, "duckdb", *args)


@pytest.mark.parametrize(("args", "message"), [
    (["--dims", "[1]"], "must be a JSON object"),
    (["--start", "yesterday"], "not an ISO-8601 time"),
    (["--from", "bigtable"], "needs --bigtable_project"),
    (["--from", "bigquery"], "needs --bigquery_project and --bigquery_dataset"),
    (["--from", "bigquery", "--bigquery_project", "p"], "needs --bigquery_project and"),
    (["--from", "bigquery", "--bigquery_project", "p", "--bigquery_dataset", "d",
      "--bigquery_endpoint", "127.0.0.1:9050"], "--bigquery_endpoint needs a scheme"),
])
def test_bad_queries_say_what_is_wrong(args, message, tmp_path) -> None:
    base = {"--metric": "events", "--granularity": "day", "--from": "duckdb"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [x for pair in base.items() for x in pair]
    with pytest.raises(SystemExit, match=message):
        cli.main(["query", *argv, "--duckdb_path", os.fspath(tmp_path / "none.duckdb")])
