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
