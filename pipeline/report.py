"""A human-readable view of the DuckDB output: what the demo prints."""

from __future__ import annotations

import os

from transforms.sink_duckdb import read_rows


def print_report(path: str, changelog: bool = False) -> None:
    print(f"\nDuckDB file: {os.path.abspath(path)}")
    print(f"  query it:  duckdb {path} \"SELECT * FROM metric_latest LIMIT 10\"")
    print(f"        or:  python -c \"import duckdb; print(duckdb.connect('{path}', "
          "read_only=True).sql('FROM metric_latest'))\"")
    daily = read_rows(path, """
        SELECT strftime(window_start AT TIME ZONE 'UTC', '%Y-%m-%d'), metric, dims, value,
               is_final
        FROM metric_latest WHERE granularity = 'day'
        ORDER BY 1, metric, dims""")
    print("\nDaily metrics (metric_latest, granularity=day):")
    for day, metric, dims, value, final in daily:
        print(f"  {day}  {metric:<14} {dims:<44} {value:>10,}  "
              f"{'final' if final else 'open'}")
    hourly = read_rows(path, """
        SELECT strftime(window_start AT TIME ZONE 'UTC', '%Y-%m-%d %H:00'), value
        FROM metric_latest WHERE granularity = 'hour' AND metric = 'active_users'
        ORDER BY 1""")
    print("\nHourly active users:")
    for hour, value in hourly:
        print(f"  {hour}  {value:>8,}  {'#' * max(1, value * 40 // max(v for _, v in hourly))}")
    dead = read_rows(path, "SELECT reason, count(*) FROM dead_letter GROUP BY 1 ORDER BY 1")
    print("\nDead letter by reason: " + ", ".join(f"{r}={n}" for r, n in dead))
    if changelog:
        rows = read_rows(path, """
            SELECT timing, sign, count(*) FROM metric_changelog GROUP BY 1, 2 ORDER BY 1, 2""")
        print("Changelog rows by timing and sign: " + ", ".join(
            f"{t}/{'+' if s > 0 else '-'}={n}" for t, s, n in rows))


def print_day_revisions(path: str, day: str, metric: str = "active_users") -> None:
    """Day D's daily `metric` through its changelog (every revision, the retractions
    folded in), then every BATCH correction of day D's windows: what a consumer sees."""
    from pipeline.finalize import day_bounds

    start, end = day_bounds(day)
    rows = read_rows(path, """
        SELECT revision, timing, value, is_final
        FROM metric_changelog
        WHERE sign > 0 AND granularity = 'day' AND metric = ? AND dims = '{}'
          AND window_start = ?
        ORDER BY revision""", [metric, start])
    print(f"\n{metric} for {day} (day window), every revision in metric_changelog:")
    print("  revision  timing   value  final")
    for revision, timing, value, final in rows:
        print(f"  {revision:>8}  {timing:<7} {value:>6,}  {final}")
    batch = read_rows(path, """
        SELECT n.metric, n.dims, n.granularity,
               strftime(n.window_start AT TIME ZONE 'UTC', '%Y-%m-%d %H:00'),
               o.value, n.value, n.revision
        FROM metric_changelog n
        LEFT JOIN metric_changelog o
          ON o.metric = n.metric AND o.dims = n.dims AND o.granularity = n.granularity
         AND o.window_start = n.window_start AND o.revision = n.revision - 1
         AND o.sign = -1
        WHERE n.timing = 'BATCH' AND n.sign > 0
          AND n.window_start >= ? AND n.window_start < ?
        ORDER BY n.granularity, 4, n.metric, n.dims, n.revision""", [start, end])
    print(f"\nBATCH corrections of {day}'s windows ({len(batch)}):")
    for m, dims, granularity, start, old, new, revision in batch:
        old_text = "—" if old is None else f"{old:,}"
        print(f"  {granularity:<4} {start}  {m:<13} {dims:<30} {old_text:>6} → {new:>6,}"
              f"  (revision {revision})")
