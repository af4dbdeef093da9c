"""Compare what a sink holds with the oracle's exact answer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pipeline.oracle import MetricKey
from transforms.sink_duckdb import read_rows


def latest_from_duckdb(path: str) -> dict[MetricKey, int]:
    rows = read_rows(path, "SELECT metric, dims, granularity, window_start, value "
                           "FROM metric_latest")
    return {(m, d, g, w.astimezone(UTC).isoformat()): v for m, d, g, w, v in rows}


def latest_by_key(rows: Iterable[Mapping[str, Any]]) -> dict[MetricKey, tuple[int, int]]:
    """(value, revision) per key of the latest rows a store gives back (its ``read_held``
    reader, pipeline/options.py): what stores must agree on, whatever their shape."""
    return {(r["metric"], r["dims"], r["granularity"],
             r["window_start"].astimezone(UTC).isoformat()): (r["value"], r["revision"])
            for r in rows}


def differences(actual: dict[MetricKey, int], expected: dict[MetricKey, int],
                relative_tolerance: dict[str, float] | None = None) -> list[str]:
    """Human-readable differences; metrics named in relative_tolerance may differ by
    at most that fraction (HLL estimates), every other metric must be exact."""
    tolerance = relative_tolerance or {}
    problems = []
    for key in sorted(set(actual) | set(expected)):
        got, want = actual.get(key), expected.get(key)
        if got is None or want is None:
            problems.append(f"{key}: pipeline={got} oracle={want}")
            continue
        allowed = tolerance.get(key[0], 0.0) * want
        if abs(got - want) > allowed:
            problems.append(f"{key}: pipeline={got} oracle={want}")
    return problems


# Joined from both sides: a key with changelog rows but no latest row (or the reverse)
# is a mismatch too, not a row the check never looks at.
_CHANGELOG_MISMATCHES = """
    SELECT metric, dims, granularity, window_start, c.total, l.value
    FROM metric_latest l
    FULL OUTER JOIN (SELECT metric, dims, granularity, window_start,
                            sum(sign * value) AS total
                     FROM metric_changelog GROUP BY ALL) c
      USING (metric, dims, granularity, window_start)
    WHERE c.total IS DISTINCT FROM l.value"""


def changelog_mismatches(path: str) -> list[tuple]:
    """Windows whose changelog does not sum (sign × value) to their latest value."""
    return read_rows(path, _CHANGELOG_MISMATCHES)


def windows_not_final(path: str) -> int:
    return read_rows(path, "SELECT count(*) FROM metric_latest WHERE NOT is_final")[0][0]


_TIMING_RANK = {"EARLY": 0, "ON_TIME": 1, "LATE": 2}


def timing_violations(path: str, one_on_time: bool = False,
                      require_final: bool = True) -> list[tuple]:
    """Windows and keys whose revisions break the timing rules (docs/correctness.md):
    EARLY ones, at most one ON_TIME (exactly one with ``one_on_time``), then LATE ones,
    and a final mark, last, repeating the timing it closes (``require_final=False``: a
    window still open, its horizon not yet passed, may lack it). Returns (key, timings)."""
    rows = read_rows(path, """
        SELECT metric, dims, granularity, window_start, list(timing ORDER BY revision),
               list(is_final ORDER BY revision)
        FROM metric_changelog WHERE sign > 0 GROUP BY ALL""")
    bad = []
    for *key, timings, finals in rows:
        closed = finals[-1]
        body = timings[:-1] if closed else timings
        ranks = [_TIMING_RANK[t] for t in body]
        on_time = body.count("ON_TIME")
        if ((require_final and not closed) or any(finals[:-1]) or ranks != sorted(ranks)
                or (closed and timings[-1] != (body[-1] if body else None))
                or on_time > 1 or (one_on_time and on_time != 1)):
            bad.append((tuple(key), timings))
    return bad


def timings_by_key(path: str) -> dict[MetricKey, tuple[datetime, list[str]]]:
    """(window end, timings in revision order) per key, from the changelog."""
    rows = read_rows(path, """
        SELECT metric, dims, granularity, window_start, window_end,
               list(timing ORDER BY revision)
        FROM metric_changelog WHERE sign > 0 GROUP BY ALL""")
    return {(m, d, g, w.astimezone(UTC).isoformat()): (end, timings)
            for m, d, g, w, end, timings in rows}


def timings_seen(path: str) -> set[str]:
    return {t for (t,) in read_rows(
        path, "SELECT DISTINCT timing FROM metric_changelog WHERE sign > 0")}
