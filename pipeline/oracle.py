"""The exact answer: metrics computed directly from the generator's ground truth.

Written independently of the Beam transforms (plain Python over a list), so that the
tests compare the pipeline with a second implementation, not with itself.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas import GRANULARITY_MS

HOUR_MS = GRANULARITY_MS["hour"]
DAY_MS = GRANULARITY_MS["day"]


@dataclass(frozen=True)
class TruthEvent:
    """A valid, unique event as the generator made it."""

    event_id: str
    event_type: str
    event_time_ms: int
    identity: str
    feature: str | None
    arrival_ms: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> TruthEvent:
        return cls(**json.loads(line))


def _dims(**dims: str) -> str:
    return json.dumps(dims, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


MetricKey = tuple[str, str, str, str]  # metric, dims, granularity, window_start (ISO)


def first_copies(copies_in_arrival_order: Iterable[TruthEvent]) -> list[TruthEvent]:
    """The dedup rule: of every copy of an event_id, the first to arrive is the event,
    whatever the others' bytes or event time; the rest are duplicates."""
    first: dict[str, TruthEvent] = {}
    for copy in copies_in_arrival_order:
        first.setdefault(copy.event_id, copy)
    return list(first.values())


def expected_metrics(
    events: Iterable[TruthEvent],
    funnel_steps: Sequence[str],
    counted: Callable[[TruthEvent, str], bool] = lambda event, granularity: True,
) -> dict[MetricKey, int]:
    """Every metric's final value per window. `counted(event, granularity)` says whether
    the event reaches that granularity's windows (False when too late for them)."""
    counts: dict[MetricKey, int] = defaultdict(int)
    users: dict[MetricKey, set[str]] = defaultdict(set)
    funnel_times: dict[int, dict[str, dict[int, list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    step_index = {name: i for i, name in enumerate(funnel_steps)}
    for event in events:
        for granularity, size in (("hour", HOUR_MS), ("day", DAY_MS)):
            if not counted(event, granularity):
                continue
            start = _iso(event.event_time_ms // size * size)
            counts[("events", _dims(event_type=event.event_type), granularity, start)] += 1
            users[("active_users", "{}", granularity, start)].add(event.identity)
            if granularity != "day":
                continue
            if event.event_type == "feature_use" and event.feature is not None:
                users[("feature_users", _dims(feature=event.feature), "day", start)].add(
                    event.identity)
            if event.event_type in step_index:
                day = event.event_time_ms // DAY_MS
                funnel_times[day][event.identity][step_index[event.event_type]].append(
                    event.event_time_ms)
    result = dict(counts)
    result.update({key: len(ids) for key, ids in users.items()})
    for day, per_identity in funnel_times.items():
        reached = [0] * len(funnel_steps)
        for times_by_step in per_identity.values():
            # Earliest time each prefix can be completed; equal times count as in order.
            done_at = -1
            for step in range(len(funnel_steps)):
                later = [t for t in times_by_step.get(step, []) if t >= done_at]
                if not later:
                    break
                done_at = min(later)
                reached[step] += 1
        for step, name in enumerate(funnel_steps):
            key = ("funnel_step", _dims(name=name, step=str(step + 1)), "day",
                   _iso(day * DAY_MS))
            result[key] = reached[step]
    return result


def to_json(metrics: dict[MetricKey, int]) -> list[dict]:
    return [
        {"metric": m, "dims": d, "granularity": g, "window_start": w, "value": v}
        for (m, d, g, w), v in sorted(metrics.items())
    ]


def from_json(rows: Iterable[dict]) -> dict[MetricKey, int]:
    return {(r["metric"], r["dims"], r["granularity"], r["window_start"]): r["value"]
            for r in rows}
