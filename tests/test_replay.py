"""Replay: a generated dataset streamed in arrival order (TestStream) ends equal to the
oracle, where the oracle drops exactly the events that arrive after their windows'
allowed lateness, by the replay's own watermark rule."""

from __future__ import annotations

import os

import pytest

from pipeline import oracle
from pipeline.compare import differences, latest_from_duckdb
from pipeline.generator import DEFAULT_FUNNEL, GeneratorConfig, read_truth, write_dataset
from pipeline.replay import run_replay, watermark_at
from transforms.sink_duckdb import read_rows

STEP_S, LAG_S, LATENESS_S = 3600, 300, 3 * 86400
SIZES = {"hour": 3_600_000, "day": 86_400_000}


def expected_after_lateness(data: str) -> dict[oracle.MetricKey, int]:
    """The oracle for a replay with STEP_S and LAG_S: events that arrive after their
    window's allowed lateness (by the replay's watermark rule) are not counted."""

    def counted(event: oracle.TruthEvent, granularity: str) -> bool:
        size = SIZES[granularity]
        window_end_s = (event.event_time_ms // size + 1) * size / 1000
        return window_end_s + LATENESS_S > watermark_at(event.arrival_ms, STEP_S, LAG_S)

    truth = read_truth(data)
    dropped = [e for e in truth if not counted(e, "day")]
    assert dropped, "the dataset must contain events past the allowed lateness"
    return oracle.expected_metrics(truth, DEFAULT_FUNNEL, counted)


@pytest.mark.integration  # a TestStream replay of a day: >10 s
def test_replay_matches_the_oracle_with_too_late_events_dropped(tmp_path) -> None:
    data = str(tmp_path / "data")
    write_dataset(data, GeneratorConfig(events=1500, seed=5, too_late_rate=0.02))
    db = str(tmp_path / "replay.duckdb")
    run_replay(["--replay_dir", data, "--duckdb_path", db, "--late_firing_s", "0",
                "--replay_step_s", str(STEP_S), "--watermark_lag_s", str(LAG_S)])
    assert differences(latest_from_duckdb(db), expected_after_lateness(data)) == []
    timings = dict(read_rows(db, "SELECT timing, count(*) FROM metric_changelog "
                                 "WHERE sign > 0 GROUP BY timing"))
    assert timings.get("EARLY") and timings.get("ON_TIME") and timings.get("LATE")
    assert read_rows(db, "SELECT count(*) FROM metric_latest WHERE NOT is_final") == [(0,)]
    assert len(os.listdir(data)) >= 3
