"""The serving API answers the same from DuckDB, the Bigtable emulator and local-bigquery.

One job run (`--distinct hll`, all three sinks in one graph) over a few generated days
of one user population; then the same requests to an app over each store. Series,
unique users (the same stored sketches unioned), funnel and adoption agree across the
three and with the oracle; changelog and dead letters agree between DuckDB and BigQuery,
and Bigtable, which keeps latest values only, answers 404 saying where they are.
"""

from __future__ import annotations

import json
import os
from datetime import date, timedelta

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from fastapi.testclient import TestClient

from pipeline import oracle
from pipeline.generator import GeneratorConfig, read_truth, write_days
from pipeline.job import build
from pipeline.options import ClickstreamOptions
from serving.app import create_app
from serving.stores import open_store
from tests import servers
from tests.fixtures_servers import bigquery_server, bigtable_emulator  # noqa: F401
from tests.serve_data import day_of, within_hll_error

PROJECT, INSTANCE, TABLE = "serve-project", "serve-instance", "serve_latest"
BQ_PROJECT, BQ_DATASET = "local", "serve"
FIRST = date(2026, 11, 1)
DAYS = 3
LAST = FIRST + timedelta(days=DAYS - 1)
STORES = ("duckdb", "bigtable", "bigquery")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def apis(bigtable_emulator, bigquery_server, tmp_path_factory):  # noqa: F811
    data = str(tmp_path_factory.mktemp("serve-stores-data"))
    write_days(data, GeneratorConfig(events=600, seed=17, date=FIRST.isoformat()), DAYS)
    db = str(tmp_path_factory.mktemp("serve-stores") / "out.duckdb")
    options = PipelineOptions([
        "--input_files", os.path.join(data, "events-*.jsonl"), "--duckdb_path", db,
        "--distinct", "hll",
        "--bigtable_project", PROJECT, "--bigtable_instance", INSTANCE,
        "--bigtable_table", TABLE,
        "--bigquery_project", BQ_PROJECT, "--bigquery_dataset", BQ_DATASET])
    p = beam.Pipeline(options=options)
    build(p, options.view_as(ClickstreamOptions), bigquery_test_client=(
        servers.LocalBigQueryTestClient(bigquery_server, BQ_PROJECT)))
    p.run().wait_until_finish()
    settings = {"duckdb_path": db, "bigtable_project": PROJECT,
                "bigtable_instance": INSTANCE, "bigtable_table": TABLE,
                "bigquery_project": BQ_PROJECT, "bigquery_dataset": BQ_DATASET,
                "bigquery_endpoint": f"http://{bigquery_server}"}
    with open(os.path.join(data, "expected.json")) as f:
        expected = json.load(f)
    return ({store: TestClient(create_app(open_store(store, settings))) for store in STORES},
            oracle.from_json(expected["metrics"]), expected, read_truth(data))


def answers(apis, path: str, **params) -> dict[str, dict]:
    clients = apis[0]
    out = {}
    for store, client in clients.items():
        response = client.get(path, params=params)
        assert response.status_code == 200, (store, response.text)
        body = response.json()
        body.pop("store")
        out[store] = body
    return out


@pytest.mark.parametrize(("path", "params"), [
    ("/api/series", {"metric": "active_users", "granularity": "day"}),
    ("/api/series", {"metric": "active_users", "granularity": "hour",
                     "start": f"{LAST}T00:00Z", "end": f"{LAST}T12:00Z"}),
    ("/api/series", {"metric": "feature_users", "granularity": "day",
                     "dims": '{"feature":"search"}'}),
    ("/api/uniques", {"end": LAST.isoformat(), "days": DAYS}),
    ("/api/uniques", {"end": LAST.isoformat(), "days": 1}),
    ("/api/uniques", {"metric": "feature_users", "dims": '{"feature":"share"}',
                      "end": LAST.isoformat(), "days": DAYS}),
    ("/api/funnel", {"start": FIRST.isoformat(), "end": LAST.isoformat()}),
    ("/api/adoption", {"end": LAST.isoformat()}),
])
def test_every_store_gives_the_same_answer(apis, path, params) -> None:
    got = answers(apis, path, **params)
    assert got["bigtable"] == got["duckdb"]
    assert got["bigquery"] == got["duckdb"]


def test_the_answers_are_the_oracles(apis) -> None:
    _, want, _, truth_events = apis
    series = answers(apis, "/api/series", metric="events", granularity="day",
                     dims='{"event_type":"purchase"}')["bigtable"]
    assert {p["window_start"].replace("Z", "+00:00"): p["value"] for p in series["points"]} \
        == {w: v for (m, d, g, w), v in want.items()
            if (m, d, g) == ("events", '{"event_type":"purchase"}', "day")}
    mau = answers(apis, "/api/uniques", end=LAST.isoformat(), days=DAYS)["bigquery"]
    truth = {e.identity for e in truth_events
             if FIRST <= day_of(e.event_time_ms) <= LAST}
    assert mau["mode"] == "hll" and within_hll_error(mau["value"], truth,
                                                     mau["relative_standard_error"])


def test_changelog_and_dead_letters_from_duckdb_and_bigquery_bigtable_says_where(apis
                                                                                 ) -> None:
    clients, _, expected, _ = apis
    window = {"metric": "active_users", "granularity": "day",
              "window_start": f"{LAST.isoformat()}T00:00:00Z"}
    changelog = {s: clients[s].get("/api/changelog", params=window).json()
                 for s in ("duckdb", "bigquery")}
    for body in changelog.values():
        body.pop("store")
    assert changelog["bigquery"] == changelog["duckdb"]
    assert [(r["revision"], r["sign"]) for r in changelog["duckdb"]["rows"]] == [
        (1, 1), (1, -1), (2, 1)]
    dead = {s: clients[s].get("/api/dead_letters").json()["reasons"]
            for s in ("duckdb", "bigquery")}
    assert dead["bigquery"] == dead["duckdb"]
    assert {r["reason"]: r["count"] for r in dead["duckdb"]} == expected["counts"][
        "dead_letter_by_reason"]
    for path, params in (("/api/changelog", window), ("/api/dead_letters", {})):
        response = clients["bigtable"].get(path, params=params)
        assert response.status_code == 404
        assert "DuckDB or BigQuery" in response.json()["detail"]
