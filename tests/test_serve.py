"""The serving API over DuckDB: every endpoint against the generator's oracle, the stored
sketches against the revision rules, and bad parameters answered 4xx with a message.

The data set (tests/serve_data.py): eight generated days of one user population, run
once through the job with `--distinct hll` and the raw archive. The oracle is the
generator's truth, computed without the pipeline.
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasketches
import pytest
from fastapi.testclient import TestClient

from serving.app import ServeConfig, create_app
from serving.stores import DuckDBStore
from tests.serve_data import (  # noqa: F401 - served is a fixture
    DAYS,
    FIRST_DAY,
    late_revision,
    series_of,
    served,
    within_hll_error,
)
from transforms.sink_duckdb import read_rows

LAST_DAY = FIRST_DAY + timedelta(days=DAYS - 1)
# The served data set is a run of the job (~15 s, once per session).
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(served) -> TestClient:  # noqa: F811
    return TestClient(create_app(DuckDBStore(served.db),
                                 ServeConfig(archive_path=served.archive)))


def get(api: TestClient, path: str, **params) -> dict:
    response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_sketches_follow_the_values_revision_rules(served) -> None:  # noqa: F811
    rows = read_rows(served.db, """
        SELECT metric, dims, granularity, window_start, revision, sign, value, sketch
        FROM metric_changelog WHERE metric IN ('active_users', 'feature_users')""")
    assert len(rows) > 100
    by_key = {(m, d, g, w, r, s): (v, sk) for m, d, g, w, r, s, v, sk in rows}
    for (m, d, g, w, r, s), (value, sketch) in by_key.items():
        assert sketch is not None, (m, d, g, w, r, s)
        assert round(datasketches.hll_sketch.deserialize(sketch).get_estimate()) == value
        if s < 0:  # a retraction repeats the retracted revision's sketch, byte for byte
            assert by_key[(m, d, g, w, r, 1)] == (value, sketch)
    latest = read_rows(served.db, """
        SELECT l.sketch = c.sketch FROM metric_latest l JOIN metric_changelog c
        USING (metric, dims, granularity, window_start, revision)
        WHERE c.sign > 0 AND metric IN ('active_users', 'feature_users')""")
    assert latest and all(same for (same,) in latest)
    assert read_rows(served.db, "SELECT count(*) FROM metric_latest WHERE sketch IS NOT "
                     "NULL AND metric NOT IN ('active_users', 'feature_users')") == [(0,)]


def test_series_points_carry_value_revision_timing_and_state(api, served) -> None:  # noqa: F811
    body = get(api, "/api/series", metric="events", granularity="day",
               dims='{"event_type": "page_view"}')
    want = series_of(served.want, "events", "day", '{"event_type":"page_view"}')
    assert len(want) >= DAYS
    assert {p["window_start"].replace("Z", "+00:00"): p["value"] for p in body["points"]} \
        == want
    for point in body["points"]:
        assert point["is_final"] and point["state"] == "final" and point["revision"] >= 2
        assert point["timing"] == "ON_TIME"


def test_daily_active_users_are_within_the_sketch_error(api, served) -> None:  # noqa: F811
    body = get(api, "/api/series", metric="active_users", granularity="day",
               start=FIRST_DAY.isoformat(), end=(LAST_DAY + timedelta(days=1)).isoformat())
    want = series_of(served.want, "active_users", "day")
    assert len(body["points"]) == DAYS
    for point in body["points"]:
        truth = want[point["window_start"].replace("Z", "+00:00")]
        assert within_hll_error(point["value"], truth, 0.0162), (point, truth)


@pytest.mark.parametrize("days", [1, 7, DAYS])
def test_uniques_over_a_range_union_the_daily_sketches(api, served, days) -> None:  # noqa: F811
    body = get(api, "/api/uniques", end=LAST_DAY.isoformat(), days=days)
    truth = served.identities(LAST_DAY - timedelta(days=days - 1), LAST_DAY)
    assert body["mode"] == "hll" and body["days_with_sketch"] == days and body["complete"]
    assert body["start"] == (LAST_DAY - timedelta(days=days - 1)).isoformat()
    assert 0.01 < body["relative_standard_error"] < 0.02  # lg_k 12: 1.6%
    assert within_hll_error(body["value"], truth, body["relative_standard_error"])
    assert body["lower_bound_2sd"] <= body["value"] <= body["upper_bound_2sd"]
    # A range's users are more than any one day's and fewer than the days' sum.
    if days > 1:
        daily = [len(served.identities(d, d)) for d in
                 (LAST_DAY - timedelta(days=i) for i in range(days))]
        assert max(daily) < body["value"] < sum(daily)


def test_exact_uniques_read_the_archive(api, served) -> None:  # noqa: F811
    body = get(api, "/api/uniques", end=LAST_DAY.isoformat(), days=7, mode="exact")
    assert body["mode"] == "exact" and body["relative_standard_error"] == 0.0
    assert body["value"] == len(served.identities(LAST_DAY - timedelta(days=6), LAST_DAY))
    assert body["archive_records_read"] > 0
    search = get(api, "/api/uniques", metric="feature_users", dims='{"feature":"search"}',
                 start=FIRST_DAY.isoformat(), end=LAST_DAY.isoformat(), mode="exact")
    assert search["value"] == len(served.identities(FIRST_DAY, LAST_DAY, "search")) > 0


def test_funnel_of_a_day_and_of_a_range(api, served) -> None:  # noqa: F811
    steps = served.expected["funnel_steps"]

    def oracle_funnel(days: list[date]) -> list[int]:
        return [sum(served.want.get(("funnel_step", json.dumps(
            {"name": name, "step": str(i + 1)}, sort_keys=True, separators=(",", ":")),
            "day", f"{d.isoformat()}T00:00:00+00:00"), 0) for d in days)
            for i, name in enumerate(steps)]

    day = get(api, "/api/funnel", end=LAST_DAY.isoformat())
    want = oracle_funnel([LAST_DAY])
    assert [s["users"] for s in day["steps"]] == want and want[0] > 0
    assert [s["name"] for s in day["steps"]] == steps
    for previous, step in zip(day["steps"], day["steps"][1:], strict=False):
        assert step["conversion_from_previous"] == pytest.approx(
            step["users"] / previous["users"], abs=1e-4)
    week = get(api, "/api/funnel", start=(LAST_DAY - timedelta(days=6)).isoformat(),
               end=LAST_DAY.isoformat())
    assert [s["users"] for s in week["steps"]] == oracle_funnel(
        [LAST_DAY - timedelta(days=i) for i in range(7)])


def test_feature_adoption_exact_and_hll(api, served) -> None:  # noqa: F811
    exact = get(api, "/api/adoption", end=LAST_DAY.isoformat(), mode="exact")
    active = len(served.identities(LAST_DAY, LAST_DAY))
    assert exact["features"]
    for row in exact["features"]:
        users = len(served.identities(LAST_DAY, LAST_DAY, row["feature"]))
        assert (row["feature_users"], row["active_users"]) == (users, active)
        assert row["adoption"] == pytest.approx(users / active, abs=1e-4)
    hll = get(api, "/api/adoption", end=LAST_DAY.isoformat())
    assert hll["mode"] == "hll"
    assert [r["feature"] for r in hll["features"]] == [r["feature"] for r in exact["features"]]
    for got, want in zip(hll["features"], exact["features"], strict=True):
        assert within_hll_error(got["feature_users"], want["feature_users"], 0.0162)


def test_changelog_of_one_window_sums_to_its_latest_value(api, served) -> None:  # noqa: F811
    start = f"{LAST_DAY.isoformat()}T00:00:00Z"
    body = get(api, "/api/changelog", metric="active_users", granularity="day",
               window_start=start)
    rows = body["rows"]
    assert [(r["revision"], r["sign"]) for r in rows] == [(1, 1), (1, -1), (2, 1)]
    latest = get(api, "/api/series", metric="active_users", granularity="day",
                 start=start)["points"][0]
    assert sum(r["sign"] * r["value"] for r in rows) == latest["value"]
    assert rows[-1]["is_final"] and not rows[0]["is_final"]


def test_dead_letters_by_reason(api, served) -> None:  # noqa: F811
    body = get(api, "/api/dead_letters")
    want = served.expected["counts"]["dead_letter_by_reason"]
    assert {r["reason"]: r["count"] for r in body["reasons"]} == want
    assert body["total"] == sum(want.values()) > 0


def test_health_without_metrics_says_unknown(api, served) -> None:  # noqa: F811
    body = get(api, "/api/health")
    assert body["watermark_lag_s"] == "unknown" and body["backlog"] == "unknown"
    assert "--metrics_url" in body["metrics_error"]
    assert body["newest_day"] >= LAST_DAY.isoformat()
    assert body["last_pane_emitted_at"].endswith("Z") and body["last_pane_age_s"] >= 0


def test_health_reads_the_jobs_prometheus_endpoint(served) -> None:  # noqa: F811
    text = (b"# TYPE clickstream_watermark_lag_seconds gauge\n"
            b'clickstream_watermark_lag_seconds{job="clickstream"} 42.5\n'
            b'clickstream_kafka_consumer_lag{partition="0"} 10\n'
            b'clickstream_kafka_consumer_lag{partition="1"} 5\n')

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        api = TestClient(create_app(DuckDBStore(served.db), ServeConfig(metrics_url=url)))
        body = get(api, "/api/health")
        assert (body["watermark_lag_s"], body["backlog"]) == (42.5, 15)
        assert body["metrics_error"] is None and body["metrics_source"] == url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    gone = get(api, "/api/health")  # the endpoint went away: unknown, and why
    assert gone["watermark_lag_s"] == "unknown" and "could not read" in gone["metrics_error"]


@pytest.mark.parametrize(("path", "params", "status", "says"), [
    ("/api/series", {"metric": "nope", "granularity": "day"}, 422, "active_users"),
    ("/api/series", {"metric": "events", "granularity": "week"}, 422, "hour"),
    ("/api/series", {"metric": "events", "granularity": "day", "dims": "{bad"}, 400,
     "dims is not JSON"),
    ("/api/series", {"metric": "events", "granularity": "day", "start": "monday"}, 400,
     "ISO-8601"),
    ("/api/uniques", {"end": "2026-13-01"}, 400, "YYYY-MM-DD"),
    ("/api/uniques", {"days": 0}, 422, "greater than or equal to 1"),
    ("/api/uniques", {"start": "2026-11-05", "end": "2026-11-01"}, 400, "after end"),
    ("/api/uniques", {"metric": "events"}, 422, "feature_users"),
    ("/api/uniques", {"mode": "bloom"}, 422, "exact"),
    ("/api/changelog", {"metric": "events", "granularity": "day"}, 422, "window_start"),
    ("/api/changelog", {"metric": "active_users", "granularity": "day",
                        "window_start": "1999-01-01"}, 404, "no changelog rows"),
])
def test_bad_parameters_get_a_4xx_that_says_what_to_send(api, path, params, status, says
                                                         ) -> None:
    response = api.get(path, params=params)
    assert response.status_code == status, response.text
    assert says in response.text
    assert "Traceback" not in response.text


def test_exact_mode_without_an_archive_says_what_to_start_serve_with(served) -> None:  # noqa: F811
    api = TestClient(create_app(DuckDBStore(served.db)))
    response = api.get("/api/uniques", params={"mode": "exact"})
    assert response.status_code == 400 and "--archive_path" in response.text


def test_an_unexpected_error_is_a_500_without_a_stack_trace(tmp_path) -> None:
    (tmp_path / "not-a-db.duckdb").write_text("this is no DuckDB file")
    api = TestClient(create_app(DuckDBStore(str(tmp_path / "not-a-db.duckdb"))),
                     raise_server_exceptions=False)
    response = api.get("/api/health")
    assert response.status_code == 500
    assert "internal error" in response.json()["detail"]
    assert "Traceback" not in response.text and "File \"" not in response.text


def test_openapi_docs_list_every_endpoint(api) -> None:
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/api/series", "/api/uniques", "/api/funnel", "/api/adoption", "/api/changelog",
            "/api/dead_letters", "/api/health"} <= set(paths)


def test_serve_without_its_connection_flags_says_which(capsys) -> None:
    from pipeline import cli

    assert cli.main(["serve", "--from", "bigtable", "--port", "0"]) == 2
    assert "--bigtable_project" in capsys.readouterr().err


def test_answers_are_reused_only_while_the_file_is_unchanged(served, tmp_path) -> None:  # noqa: F811
    db = str(tmp_path / "cached.duckdb")
    shutil.copy(served.db, db)
    store = DuckDBStore(db)
    api = TestClient(create_app(store, ServeConfig(archive_path=served.archive)))
    day = datetime.combine(LAST_DAY, datetime.min.time(), tzinfo=UTC)
    params = {"metric": "active_users", "granularity": "day", "start": LAST_DAY.isoformat()}
    first = get(api, "/api/series", **params)["points"][0]
    version = store.data_version()
    mau = get(api, "/api/uniques", days=DAYS)["value"]
    assert get(api, "/api/series", **params)["points"][0] == first
    assert store.data_version() == version
    new_value = late_revision(db, day, extra_users=25)  # the job writes: a new version
    assert store.data_version() != version
    now = get(api, "/api/series", **params)["points"][0]
    assert (now["value"], now["revision"], now["state"]) == (
        new_value, first["revision"] + 1, "late")
    assert get(api, "/api/uniques", days=DAYS)["value"] > mau


class _CountingStore(DuckDBStore):
    """A DuckDB store that, like Bigtable and BigQuery, cannot tell its data version."""

    def __init__(self, path: str) -> None:
        super().__init__(path, cache=False)
        self.reads = 0

    def data_version(self):
        return None

    def series(self, *args, **kwargs):
        self.reads += 1
        return super().series(*args, **kwargs)


@pytest.mark.parametrize(("max_staleness_s", "reads"), [(0, 3), (3600, 1)])
def test_a_store_without_a_version_reuses_answers_only_within_the_staleness_allowed(
        served, max_staleness_s, reads) -> None:  # noqa: F811
    store = _CountingStore(served.db)
    api = TestClient(create_app(store, ServeConfig(max_staleness_s=max_staleness_s)))
    params = {"metric": "active_users", "granularity": "day", "start": LAST_DAY.isoformat()}
    answers = [get(api, "/api/series", **params) for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]
    assert store.reads == reads


def test_the_staleness_period_ends(served, monkeypatch) -> None:  # noqa: F811
    from serving import app as app_module

    now = [1000.0]
    monkeypatch.setattr(app_module, "monotonic", lambda: now[0])
    store = _CountingStore(served.db)
    api = TestClient(create_app(store, ServeConfig(max_staleness_s=5)))
    params = {"metric": "active_users", "granularity": "day", "start": LAST_DAY.isoformat()}
    get(api, "/api/series", **params)
    now[0] += 4.9
    get(api, "/api/series", **params)
    assert store.reads == 1
    now[0] += 0.2  # past the 5 s period the first answer was kept in
    get(api, "/api/series", **params)
    assert store.reads == 2
