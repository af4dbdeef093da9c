"""Distinct users over any range of days: a union of stored daily HLL sketches, or an
exact count from the raw archive.

- `hll`: the union of the day windows' sketches (`--distinct hll` stores one per window).
  Cost: one stored row per day read and merged; the answer carries the union's relative
  standard error and 2-sigma bounds. A day whose latest revision has no sketch (a window
  written with `--distinct exact`, or corrected by an exact `finalize`) cannot be unioned:
  it is listed in `days_without_sketch` and the answer is marked incomplete.
- `exact`: every identity of the range's events, read from the raw Avro archive
  (`--archive_path`, `event_date=D/event_hour=H/*.avro`, with fastavro through Beam's
  FileSystems, so `gs://` works too). Cost: a read of every archived event of the range;
  the archive also holds events too late for the stream's windows, so this is the count
  `finalize` would give, which the stream's daily values may be short of.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta
from typing import Any

from pipeline.query import QueryError
from serving.stores import SketchRow
from transforms.distinct import union_estimate
from transforms.metrics import FEATURE_EVENT_TYPE, FEATURE_PROPERTY

MODES = ("hll", "exact")
DISTINCT_METRICS = ("active_users", "feature_users")


def days_of(start: date, end: date) -> list[date]:
    """The days of [start, end)."""
    return [start + timedelta(days=i) for i in range((end - start).days)]


def from_sketches(rows: Iterable[SketchRow], days: list[date]) -> dict[str, Any]:
    have = {row[0].date(): row for row in rows}
    sketches = [sketch for d in days if d in have and (sketch := have[d][2])]
    missing = [d.isoformat() for d in days if d in have and not have[d][2]]
    empty = [d.isoformat() for d in days if d not in have]
    answer: dict[str, Any] = {"mode": "hll", "days_with_sketch": len(sketches),
                              "days_without_sketch": missing, "days_without_data": empty,
                              "complete": not missing}
    if not sketches:
        return answer | {"value": 0, "relative_standard_error": 0.0, "lg_k": None,
                         "lower_bound_2sd": 0, "upper_bound_2sd": 0}
    union = union_estimate(sketches)
    return answer | {"value": union.estimate, "lg_k": union.lg_k,
                     "relative_standard_error": round(union.relative_standard_error, 6),
                     "lower_bound_2sd": union.lower_bound_2sd,
                     "upper_bound_2sd": union.upper_bound_2sd}


def _identities_predicate(metric: str, dims: dict[str, str]) -> Callable[[Any], bool]:
    if metric == "active_users":
        return lambda event: True
    feature = dims.get(FEATURE_PROPERTY)
    return lambda event: (event.event_type == FEATURE_EVENT_TYPE
                          and event.properties.get(FEATURE_PROPERTY) == feature)


def archive_files(base_path: str, day: date) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    from transforms.archive import day_glob

    pattern = day_glob(base_path, day.isoformat())
    if "://" not in base_path:
        return sorted(glob.glob(pattern))
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def from_archive(base_path: str, metric: str, dims: dict[str, str], days: list[date]
                 ) -> dict[str, Any]:
    """The exact count of distinct identities of the days' archived events."""
    import fastavro
    from apache_beam.io.filesystems import FileSystems

    from transforms.events import Event

    if not base_path:
        raise QueryError("mode=exact reads the raw archive: start serve with "
                         "--archive_path BASE (the job's --archive_path)")
    wanted = _identities_predicate(metric, dims)
    seen: set[str] = set()
    read, empty = 0, []
    for day in days:
        files = archive_files(base_path, day)
        if not files:
            empty.append(day.isoformat())
        for path in files:
            with FileSystems.open(path) as fh:
                for record in fastavro.reader(fh):
                    read += 1
                    event = Event.from_avro(record)  # type: ignore[arg-type]
                    if wanted(event):
                        seen.add(event.identity)
    return {"mode": "exact", "value": len(seen), "relative_standard_error": 0.0,
            "archive_records_read": read, "days_without_data": empty, "complete": True}


def day_range(end: date, days: int) -> tuple[date, date]:
    """[end - days + 1, end] as a half-open day range: `days` days ending with `end`."""
    return end - timedelta(days=days - 1), end + timedelta(days=1)


def parse_day(text: str, name: str) -> date:
    try:
        return datetime.fromisoformat(text).date() if "T" in text else date.fromisoformat(text)
    except ValueError as exc:
        raise QueryError(f"{name} must be a date, YYYY-MM-DD (got {text!r})") from exc
