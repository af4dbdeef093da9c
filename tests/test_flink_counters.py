"""The run summary where a runner returns no counters (a cancelled Flink streaming job):
it says so and reconciles from the DuckDB sink, never `read 0 ... [reconciled]`."""

from __future__ import annotations

from pathlib import Path

from pipeline.job import RunSummary, SinkTally
from transforms.sink_duckdb import connect, create_tables

COUNTERS = {"read": 10, "unique": 7, "duplicates": 2, "dead_letter": 1,
            "dead_letter.malformed_json": 1}


def test_no_counters_says_unavailable_and_never_read_zero() -> None:
    summary = RunSummary({}, 12.0, "CANCELLED")
    text = summary.render()
    assert not summary.counters_available
    assert not summary.reconciles
    assert "counters unavailable on this runner" in text
    assert "read 0" not in text and "[reconciled]" not in text
    assert "no DuckDB sink to reconcile from" in text


def test_counters_that_add_up_reconcile() -> None:
    summary = RunSummary(dict(COUNTERS), 2.0, "DONE")
    assert summary.counters_available and summary.reconciles
    assert "read 10 = unique valid 7 + duplicates 2 + dead letter 1  [reconciled]" in (
        summary.render())
    assert not RunSummary({**COUNTERS, "unique": 6}, 2.0, "DONE").reconciles


def test_sink_tally_reads_day_window_events_and_dead_letters(tmp_path: Path) -> None:
    db = str(tmp_path / "out.duckdb")
    con = connect(db)
    try:
        create_tables(con)
        con.execute("""INSERT INTO metric_latest (metric, dims, granularity, window_start,
            window_end, value, revision, timing, is_final, emitted_at) VALUES
            ('events', '{"event_type":"click"}', 'day', '2026-11-01', '2026-11-02', 5, 1,
             'ON_TIME', true, now()),
            ('events', '{"event_type":"view"}', 'day', '2026-11-01', '2026-11-02', 2, 1,
             'ON_TIME', true, now()),
            ('events', '{"event_type":"view"}', 'hour', '2026-11-01', '2026-11-01 01:00',
             2, 1, 'ON_TIME', true, now()),
            ('active_users', '{}', 'day', '2026-11-01', '2026-11-02', 3, 1, 'ON_TIME',
             true, now())""")
        con.execute("""INSERT INTO dead_letter VALUES
            ('a', 'x', 'malformed_json', '', now()), ('b', 'y', 'malformed_json', '', now()),
            ('c', 'z', 'payload_too_large', '', now())""")
    finally:
        con.close()
    tally = SinkTally.from_duckdb(db)
    assert tally.counted == 7  # day windows of `events` only
    assert tally.dead_letter == 3
    assert tally.dead_letter_by_reason == {"malformed_json": 2, "payload_too_large": 1}
    text = RunSummary({}, 1.0, "CANCELLED", sink=tally).render()
    assert "from the sink: 7 unique valid events counted in day windows, 3 dead" in text
    assert "malformed_json=2" in text
