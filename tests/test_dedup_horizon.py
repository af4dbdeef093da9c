"""Dedup's rule holds across hours and days: the first copy of an event_id wins, a copy
re-stamped into the next hour or day (a client retry, a clock fix) is a duplicate.

Streaming: TestStream on the BundleBasedDirectRunner, both arrival orders of each pair,
against pipeline/oracle.py's first-copy rule. Bounded: the generator's re-stamped
copies (GeneratorConfig.restamp_rate) through the bounded graph, against the
generator's truth.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from pipeline import generator, oracle
from tests.streaming import _COLLECTED, Collect, at, run_stream
from tests.test_property import latest_values
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig

LATENESS_S = 2 * 3600
CONFIG = MetricsConfig(allowed_lateness_s=LATENESS_S, late_firing_s=0)
MS = 0.001

# (event_id, first stamp, second stamp), seconds: pairs straddling a day and an hour.
PAIRS = [
    ("day-boundary", at(23, 59) + 59.9, at(0, 0, 1) + 0.1),
    ("hour-boundary", at(10, 59) + 59.9, at(11, 0) + 0.1),
    ("day-boundary-late-copy", at(23, 59) + 59.9, at(0, 30, 1)),
]


def copy(event_id: str, t_s: float, event_type: str) -> tuple[bytes, oracle.TruthEvent]:
    record = {"event_id": event_id, "event_type": event_type,
              "event_time": round(t_s * 1000), "device_id": "d1", "user_id": "u1"}
    truth = oracle.TruthEvent(event_id, event_type, round(t_s * 1000), "u1", None, 0)
    return json.dumps(record).encode(), truth


def arrivals() -> list[tuple[bytes, oracle.TruthEvent]]:
    """Each pair in both orders (its own event_id and event type per order), the copies
    arriving a chunk apart so the first is through dedup before the second comes."""
    first, second = [], []
    for event_id, a, b in PAIRS:
        for order, (t1, t2) in (("ab", (a, b)), ("ba", (b, a))):
            kind = f"{event_id}-{order}".replace("-", "_")
            first.append(copy(f"{event_id}-{order}", t1, kind))
            second.append(copy(f"{event_id}-{order}", t2, kind))
    return first + second


def test_restamped_copies_across_hours_and_days_count_once_streaming() -> None:
    copies = arrivals()
    half = len(copies) // 2
    stream = TestStream().advance_watermark_to(at(9))
    for chunk in (copies[:half], copies[half:]):
        stream = stream.add_elements(
            [TimestampedValue(p, t.event_time_ms * MS) for p, t in chunk]
        ).advance_processing_time(61)
    changelog, dead = run_stream(stream.advance_watermark_to_infinity(), CONFIG)
    assert dead == []
    expected = oracle.expected_metrics(oracle.first_copies(t for _, t in copies),
                                       DEFAULT_FUNNEL)
    assert latest_values(changelog) == expected


def run_bounded(payloads: list[bytes]) -> tuple[list[dict], list[dict]]:
    from pipeline.graph import ClickstreamMetrics

    with beam.Pipeline() as p:
        changelog, dead = (p | beam.Create(payloads)
                           | ClickstreamMetrics(CONFIG.for_bounded_input()))
        changelog | "C" >> beam.ParDo(Collect("bounded-changelog"))
        dead | "D" >> beam.ParDo(Collect("bounded-dead"))
    return _COLLECTED.pop("bounded-changelog", []), _COLLECTED.pop("bounded-dead", [])


def test_generated_restamped_copies_count_once_bounded(tmp_path) -> None:
    config = generator.GeneratorConfig(events=4000, seed=13, duplicate_rate=0.5,
                                       restamp_rate=1.0, malformed_rate=0.0, shards=1)
    gen = generator.ClickstreamGenerator(config)
    # Events near midnight, so that re-stamps cross the day as well as hours.
    gen.day_start_ms -= generator.DAY_MS // 2
    lines, truth, _ = gen.generate()
    crossing = _copies_crossing(lines, "day")
    assert crossing > 0  # the case this test is about is in the data
    changelog, dead = run_bounded([line.payload for line in lines])
    assert dead == []
    assert latest_values(changelog) == oracle.expected_metrics(truth, DEFAULT_FUNNEL)


def _copies_crossing(lines: list, granularity: str) -> int:
    """How many event_ids have copies stamped in different windows of `granularity`."""
    from pipeline.generator import GRANULARITY_MS
    from transforms.parse import common_rfc3339_ms

    windows: dict[str, set[int]] = {}
    for line in lines:
        record = json.loads(line.payload)
        t = record["event_time"]
        ms = t if isinstance(t, int) else common_rfc3339_ms(t)
        windows.setdefault(record["event_id"], set()).add(ms // GRANULARITY_MS[granularity])
    return sum(len(w) > 1 for w in windows.values())


def test_a_copy_after_its_day_is_forgotten_leaves_past_the_horizon_not_counted() -> None:
    """Once the watermark passes a day's horizon, dedup forgets its ids. A copy that
    comes after that (Kafka delivering a record again as the job drains) cannot be told
    from a first copy, and its windows are closed: it and any other event of that day
    leave on the past-horizon output (archived, counted too late), never among the first
    copies, where its event-time stamp would be behind the watermark yet ahead of it in
    the channel to the windows (on Flink they counted it twice)."""
    from apache_beam.transforms.window import TimestampedValue

    from tests.streaming import streaming_options
    from transforms.dedup import DeduplicateEvents
    from transforms.events import Event, EventBatch

    def batch(event_id: str, t_s: float) -> TimestampedValue:
        return TimestampedValue(
            EventBatch([Event(event_id, "tap", round(t_s * 1000), "d", None, None, None,
                              {})]), t_s)

    horizon_s = at(0, 0, 1) + LATENESS_S  # the first day's end + allowed lateness
    stream = (TestStream()
              .add_elements([batch("a", at(10))])
              .advance_processing_time(61)
              .advance_watermark_to(horizon_s + 1)
              .advance_processing_time(61)
              .add_elements([batch("a", at(10)), batch("b", at(11))])
              .add_elements([batch("c", at(10, 0, 1))])  # the next day: still remembered
              .advance_watermark_to_infinity())
    with beam.Pipeline(options=streaming_options()) as p:
        # One bucket: what a bucket knows of the horizon comes from its own timers, and
        # under real traffic every bucket holds every open day.
        deduped = p | stream | DeduplicateEvents(LATENESS_S, buckets=1)
        deduped.unique | "U" >> beam.ParDo(Collect("horizon-unique"))
        deduped.past_horizon | "P" >> beam.ParDo(Collect("horizon-past"))
    ids = {name: sorted(e.event_id for b in _COLLECTED.pop(name, []) for e in b)
           for name in ("horizon-unique", "horizon-past")}
    assert ids == {"horizon-unique": ["a", "c"], "horizon-past": ["a", "b"]}
