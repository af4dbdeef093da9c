"""Finalize: a day recomputed from the raw archive corrects the sink to the exact answer.

A generated day is replayed as a stream (TestStream, arrival order) with the archive
on; some events arrive after their windows' allowed lateness, so the stream's final
numbers miss them while the archive has them. Finalize must then bring metric_latest
to the oracle over every unique event of the day, with BATCH revisions exactly where a
value changed, the changelog invariant intact, every window final, and nothing written
by a second run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from datetime import UTC, datetime, timedelta

import fastavro
import pytest

import schemas
from pipeline import oracle
from pipeline.compare import changelog_mismatches, differences, latest_from_duckdb
from pipeline.finalize import day_bounds, run_finalize
from pipeline.generator import (
    DEFAULT_FUNNEL,
    GeneratorConfig,
    merge_datasets,
    read_truth,
    write_dataset,
)
from pipeline.replay import run_replay
from tests.fixtures_servers import pubsub_emulator  # noqa: F401 - a fixture
from tests.test_cli import clickstream
from transforms.archive import ARCHIVE_GLOB
from transforms.correct import correction_rows
from transforms.metrics import MetricPane
from transforms.sink_duckdb import connect, create_tables, read_rows, write_changelog

DAY = "2026-11-01"
LATER_DAY = "2026-11-06"
STEP_S, LAG_S = 3600, 300
FINALIZED_AT = datetime(2026, 11, 5, 3, 0, tzinfo=UTC)
LATEST_SQL = "SELECT * FROM metric_latest ORDER BY ALL"
CHANGELOG_SQL = "SELECT * FROM metric_changelog ORDER BY ALL"


def fixed_clock() -> datetime:
    return FINALIZED_AT


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> tuple[str, str, str]:
    """(dataset dir, archive base, DuckDB file) after a streaming replay of one day
    whose archive also holds every event a second time, as after two runs over
    overlapping input."""
    root = tmp_path_factory.mktemp("finalize")
    data, archive, db = str(root / "data"), str(root / "archive"), str(root / "stream.duckdb")
    # Day D's own traffic, then a day five days on, when offline devices sync sessions
    # of D: 24 of D's 703 events come past the lateness horizon, 28 more inside it.
    write_dataset(str(root / "d"), GeneratorConfig(events=700, seed=5, date=DAY))
    write_dataset(str(root / "d5"), GeneratorConfig(events=400, seed=6, date=LATER_DAY,
                                                    too_late_rate=0.1))
    merge_datasets(data, [str(root / "d"), str(root / "d5")])
    run_replay(["--replay_dir", data, "--duckdb_path", db, "--archive_path", archive,
                "--archive_run_id", "stream", "--late_firing_s", "0",
                "--replay_step_s", str(STEP_S), "--watermark_lag_s", str(LAG_S)])
    for path in glob.glob(os.path.join(archive, ARCHIVE_GLOB)):
        shutil.copy(path, path.replace("part-stream-", "part-rerun-"))
    return data, archive, db


def day_truth(data: str) -> list[oracle.TruthEvent]:
    start, end = (int(t.timestamp() * 1000) for t in day_bounds(DAY))
    return [e for e in read_truth(data) if start <= e.event_time_ms < end]


def archived_records(archive: str) -> int:
    """Avro records in day D's partitions, read directly (not through Beam)."""
    total = 0
    for path in glob.glob(os.path.join(archive, f"event_date={DAY}", "*", "*.avro")):
        with open(path, "rb") as f:
            total += sum(1 for _ in fastavro.reader(f))
    return total


def finalize(archive: str, db: str, *extra: str):
    return run_finalize(["--date", DAY, "--archive_path", archive, "--duckdb_path", db,
                         "--distinct", "exact", *extra], clock=fixed_clock)


def day_latest(db: str) -> dict[oracle.MetricKey, int]:
    """metric_latest of day D's windows (the replayed data has a few events of the
    days around it, whose windows finalize leaves alone)."""
    start, end = (t.isoformat() for t in day_bounds(DAY))
    return {k: v for k, v in latest_from_duckdb(db).items() if start <= k[3] < end}


def batch_keys(db: str) -> list[tuple]:
    rows = read_rows(db, "SELECT metric, dims, granularity, window_start FROM "
                         "metric_changelog WHERE timing = 'BATCH' AND sign > 0")
    return sorted((m, d, g, w.astimezone(UTC).isoformat()) for m, d, g, w in rows)


@pytest.mark.integration
def test_finalize_corrects_the_streamed_day_to_the_exact_answer(streamed, tmp_path) -> None:
    data, archive, streamed_db = streamed
    db = str(tmp_path / "sink.duckdb")
    shutil.copy(streamed_db, db)
    want = oracle.expected_metrics(day_truth(data), DEFAULT_FUNNEL)
    before = day_latest(db)
    others = {k: v for k, v in latest_from_duckdb(db).items() if k not in before}
    changed = sorted(k for k in set(before) | set(want) if before.get(k) != want.get(k))
    # The stream dropped the too-late events: without them there is nothing to correct.
    assert changed, "the replay should have missed some too-late events"
    assert changelog_mismatches(db) == []

    summary = finalize(archive, db)

    after = day_latest(db)
    assert differences(after, want) == []
    assert {k: v for k, v in latest_from_duckdb(db).items() if k not in after} == others
    assert batch_keys(db) == changed  # exactly the windows whose value changed, once each
    assert changelog_mismatches(db) == []  # sum(sign × value) = latest, per key and window
    assert read_rows(db, "SELECT count(*) FROM metric_latest WHERE NOT is_final") == [(0,)]
    revisions = {(m, d, g, w.astimezone(UTC).isoformat()): (r, t) for m, d, g, w, r, t in
                 read_rows(db, "SELECT metric, dims, granularity, window_start, revision, "
                               "timing FROM metric_latest")}
    previous = {(m, d, g, w.astimezone(UTC).isoformat()): r for m, d, g, w, r in
                read_rows(streamed_db, "SELECT metric, dims, granularity, window_start, "
                                       "revision FROM metric_latest")}
    for key in changed:
        assert revisions[key] == (previous.get(key, 0) + 1, "BATCH"), key
    # Each correction retracts the row the consumer read, at that row's revision.
    retractions = read_rows(db, """
        SELECT count(*) FROM metric_changelog n JOIN metric_changelog o
          USING (metric, dims, granularity, window_start)
        WHERE n.timing = 'BATCH' AND n.sign = 1 AND o.sign = -1
          AND o.revision = n.revision - 1 AND o.emitted_at = n.emitted_at""")
    assert retractions == [(sum(1 for k in changed if k in previous),)]
    c = summary.counters
    assert c["finalize_windows_corrected"] == len(changed)
    # Every event of D is in the archive at least twice (the copied files), and the
    # recompute counted each once.
    stored = archived_records(archive)
    assert c["archive_read"] == stored >= 2 * len(day_truth(data))
    assert c["unique"] == len(day_truth(data))
    assert c["duplicates"] == stored - c["unique"]

    # Again, from the command line: nothing changes.
    latest, changelog = read_rows(db, LATEST_SQL), read_rows(db, CHANGELOG_SQL)
    again = clickstream("finalize", "--date", DAY, "--archive_path", archive,
                        "--duckdb_path", db)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "windows corrected (BATCH revision): 0 " in again.stdout
    assert "changelog rows written: 0" in again.stdout
    assert read_rows(db, LATEST_SQL) == latest
    assert read_rows(db, CHANGELOG_SQL) == changelog


def _row(metric: str, dims: str, granularity: str, value: int, revision: int, timing: str,
         final: bool) -> schemas.ChangelogRow:
    start = day_bounds(DAY)[0]
    size = 86400 if granularity == "day" else 3600
    return {"metric": metric, "dims": dims, "granularity": granularity,
            "window_start": start,
            "window_end": datetime.fromtimestamp(start.timestamp() + size, tz=UTC),
            "value": value, "sign": 1, "revision": revision, "pane_index": 3,
            "timing": timing, "is_final": final, "emitted_at": start}


@pytest.mark.integration
def test_a_key_only_in_the_sink_is_retracted_and_open_windows_are_marked_final(
        streamed, tmp_path) -> None:
    data, archive, _ = streamed
    want = oracle.expected_metrics(day_truth(data), DEFAULT_FUNNEL)
    day_start = day_bounds(DAY)[0].isoformat()
    dau = want[("active_users", "{}", "day", day_start)]
    ghost = _row("events", '{"event_type":"ghost"}', "day", 7, 1, "EARLY", False)
    open_dau = _row("active_users", "{}", "day", dau, 2, "ON_TIME", False)
    db = str(tmp_path / "sink.duckdb")
    con = connect(db)
    try:
        create_tables(con)
        # The sink as a stream would leave it: each key's last row, its older revision
        # already retracted (rows at revision 1 for the DAU).
        write_changelog(con, [ghost, dict(open_dau, revision=1, timing="EARLY"),  # type: ignore[list-item]
                              dict(open_dau, revision=1, timing="EARLY", sign=-1),  # type: ignore[list-item]
                              open_dau])
    finally:
        con.close()

    summary = finalize(archive, db)

    latest = latest_from_duckdb(db)
    ghost_key = ("events", ghost["dims"], "day", day_start)
    assert latest.pop(ghost_key) == 0
    assert differences(latest, want) == []
    rows = read_rows(db, "SELECT value, sign, revision, timing, is_final FROM "
                         "metric_changelog WHERE dims = ? ORDER BY revision, sign",
                     [ghost["dims"]])
    assert rows == [(7, -1, 1, "EARLY", False), (7, 1, 1, "EARLY", False),
                    (0, 1, 2, "BATCH", True)]
    # Equal value, still open: the final mark as the streaming stage writes it, no BATCH.
    rows = read_rows(db, "SELECT value, sign, revision, timing, is_final FROM "
                         "metric_changelog WHERE metric = 'active_users' AND "
                         "granularity = 'day' AND revision >= 2 ORDER BY revision, sign")
    assert rows == [(dau, -1, 2, "ON_TIME", False), (dau, 1, 2, "ON_TIME", False),
                    (dau, 1, 3, "ON_TIME", True)]
    assert changelog_mismatches(db) == []
    assert read_rows(db, "SELECT count(*) FROM metric_latest WHERE NOT is_final") == [(0,)]
    c = summary.counters
    assert c["finalize_windows_marked_final"] == 1
    assert c["finalize_keys_only_in_sink"] == 1
    # Every other window was new to this sink: revision 1, BATCH.
    assert c["finalize_keys_only_in_archive"] == len(want) - 1
    assert c["finalize_windows_corrected"] == len(want)


@pytest.mark.integration
def test_finalize_refuses_a_day_the_archive_does_not_have(streamed, tmp_path) -> None:
    _, archive, streamed_db = streamed
    db = str(tmp_path / "sink.duckdb")
    shutil.copy(streamed_db, db)
    ran = clickstream("finalize", "--date", "2026-10-20", "--archive_path", archive,
                      "--duckdb_path", db)
    assert ran.returncode != 0
    assert "no archive files match" in ran.stderr + ran.stdout
    assert read_rows(db, CHANGELOG_SQL) == read_rows(streamed_db, CHANGELOG_SQL)


@pytest.mark.integration
def test_finalize_refuses_an_open_day_unless_forced(streamed, tmp_path) -> None:
    _, archive, streamed_db = streamed
    db = str(tmp_path / "sink.duckdb")
    shutil.copy(streamed_db, db)
    closes = datetime(2026, 11, 5, tzinfo=UTC)  # D + 1 day + 3 days of allowed lateness
    argv = ["--date", DAY, "--archive_path", archive, "--duckdb_path", db,
            "--distinct", "exact"]
    with pytest.raises(SystemExit, match=r"still open.*2026-11-05 00:00 UTC"):
        run_finalize(argv, clock=lambda: closes - timedelta(seconds=1))
    assert read_rows(db, CHANGELOG_SQL) == read_rows(streamed_db, CHANGELOG_SQL)
    # A shorter lateness moves the horizon with it.
    early = run_finalize([*argv, "--allowed_lateness_s", "3600"],
                         clock=lambda: datetime(2026, 11, 2, 1, tzinfo=UTC))
    assert early.counters["finalize_windows_corrected"] > 0
    forced = run_finalize([*argv, "--force_before_horizon"],
                          clock=lambda: closes - timedelta(hours=1))
    assert forced.state == "DONE"


PANE = MetricPane("events", '{"event_type":"tap"}', "hour",
                  datetime(2026, 11, 1, 3, tzinfo=UTC), datetime(2026, 11, 1, 4, tzinfo=UTC),
                  12, 0, "ON_TIME")


def _held(value: int, revision: int, final: bool, timing: str = "LATE"
          ) -> schemas.ChangelogRow:
    return {"metric": PANE.metric, "dims": PANE.dims, "granularity": "hour",
            "window_start": PANE.window_start, "window_end": PANE.window_end,
            "value": value, "sign": 1, "revision": revision, "pane_index": 5,
            "timing": timing, "is_final": final, "emitted_at": PANE.window_end}


@pytest.mark.parametrize("held, recomputed, want", [
    # (sink's latest row, recomputed value or None, [(value, sign, revision, timing,
    # is_final)] of the rows to write)
    (None, None, []),
    (_held(12, 4, True), 12, []),
    (_held(12, 4, False), 12, [(12, -1, 4, "LATE", False), (12, 1, 5, "LATE", True)]),
    (_held(10, 4, True), 12, [(10, -1, 4, "LATE", True), (12, 1, 5, "BATCH", True)]),
    (_held(10, 4, False), 12, [(10, -1, 4, "LATE", False), (12, 1, 5, "BATCH", True)]),
    (_held(10, 4, True), None, [(10, -1, 4, "LATE", True), (0, 1, 5, "BATCH", True)]),
    (_held(0, 5, True, "BATCH"), None, []),
    (None, 12, [(12, 1, 1, "BATCH", True)]),
])
def test_correction_rows(held, recomputed, want) -> None:
    pane = None if recomputed is None else PANE._replace(value=recomputed)
    rows = correction_rows(held, pane, FINALIZED_AT)
    assert [(r["value"], r["sign"], r["revision"], r["timing"], r["is_final"])
            for r in rows] == want
    assert all(r["emitted_at"] == FINALIZED_AT for r in rows)
    assert all(r["window_start"] == PANE.window_start for r in rows)
    if held is not None and rows:
        assert rows[0] == dict(held, sign=-1, emitted_at=FINALIZED_AT)


def _pull_all(subscriber, subscription: str, want: int) -> list[dict]:
    """Pulls until `want` messages came or a few pulls came back empty."""
    messages: list[dict] = []
    empty = 0
    while len(messages) < want and empty < 3:
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": 100}, timeout=30)
        if not response.received_messages:
            empty += 1
            continue
        messages.extend(json.loads(m.message.data) for m in response.received_messages)
        subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [
            m.ack_id for m in response.received_messages]})
    return messages


@pytest.mark.integration
def test_notify_topic_gets_one_message_per_corrected_window(
        streamed, tmp_path, pubsub_emulator) -> None:  # noqa: F811 - the fixture
    from google.cloud import pubsub_v1

    _, archive, streamed_db = streamed
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path("local", "day-corrections")
    subscription = subscriber.subscription_path("local", "finance")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    db = str(tmp_path / "sink.duckdb")
    shutil.copy(streamed_db, db)

    summary = finalize(archive, db, "--notify_topic", topic)

    expected = [
        {"metric": m, "dims": json.loads(d), "granularity": g,
         "window_start": w.astimezone(UTC).isoformat(), "old": old, "new": new,
         "revision": r}
        for m, d, g, w, old, new, r in read_rows(db, """
            SELECT n.metric, n.dims, n.granularity, n.window_start, o.value, n.value,
                   n.revision
            FROM metric_changelog n LEFT JOIN metric_changelog o
              ON o.metric = n.metric AND o.dims = n.dims AND o.granularity = n.granularity
             AND o.window_start = n.window_start AND o.revision = n.revision - 1
             AND o.sign = -1
            WHERE n.timing = 'BATCH' AND n.sign = 1""")]
    assert expected and any(e["old"] is not None for e in expected)
    assert summary.counters["notifications_published"] == len(expected)
    got = _pull_all(subscriber, subscription, len(expected))

    def order(m: dict) -> tuple:
        return (m["metric"], json.dumps(m["dims"]), m["granularity"], m["window_start"])

    assert sorted(got, key=order) == sorted(expected, key=order)

    # Nothing corrected the second time, so nothing to tell.
    again = finalize(archive, db, "--notify_topic", topic)
    assert again.counters.get("notifications_published", 0) == 0
    assert again.counters.get("finalize_windows_corrected", 0) == 0
