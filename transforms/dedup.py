"""Drop every repeat of an event_id, across bundles, files and hours of arrival.

Why buckets: the Python SDK pays a fixed cost per state key per bundle (its state cache
sizes each cached value, DESIGN.md), so a ValueState per event_id costs ~1 ms per event.
Keying on (hash bucket of event_id, event day) bounds the keys a bundle touches to
buckets × open days, and keeps one compact set of ids per key.

Why the event day in the key: state can then be cleared per day by an event-time timer
once that day's lateness horizon has passed, without rewriting the other days' ids.
At-least-once delivery repeats a record byte for byte, so copies share their event day.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

from transforms.events import Event

METRICS_NAMESPACE = "clickstream"
DAY_MS = 86_400_000

DedupKey = tuple[int, int]


def dedup_key(event: Event, buckets: int) -> DedupKey:
    """(stable hash bucket of the event_id, UTC day index of the event time)."""
    bucket = zlib.crc32(event.event_id.encode("utf-8")) % buckets
    return bucket, event.event_time_ms // DAY_MS


class DropRepeatedEventIdsFn(beam.DoFn):
    """Emits the first copy of each event_id in a bucket-day; counts the others."""

    SEEN_IDS = ReadModifyWriteStateSpec("seen_ids", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, allowed_lateness_s: int) -> None:
        self._allowed_lateness_ms = allowed_lateness_s * 1000
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicates")
        self._unique = Metrics.counter(METRICS_NAMESPACE, "unique")

    def process(
        self,
        keyed: tuple[DedupKey, Event],
        seen_state=beam.DoFn.StateParam(SEEN_IDS),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterable[Event]:
        (_, day), event = keyed
        seen = seen_state.read()
        if seen is None:
            seen = set()
            # The day's last window closes at day end + allowed lateness: after that no
            # copy can be counted again, so its ids can go.
            horizon_ms = (day + 1) * DAY_MS + self._allowed_lateness_ms
            expiry.set(Timestamp(micros=horizon_ms * 1000))
        elif event.event_id in seen:
            self._duplicates.inc()
            return
        seen.add(event.event_id)
        seen_state.write(seen)
        self._unique.inc()
        yield event

    @on_timer(EXPIRY)
    def expire(self, seen_state=beam.DoFn.StateParam(SEEN_IDS)) -> None:
        seen_state.clear()


class DeduplicateEvents(beam.PTransform):
    """Events → the first copy of each event_id, timestamps unchanged."""

    def __init__(self, allowed_lateness_s: int, buckets: int = 256) -> None:
        super().__init__()
        self._allowed_lateness_s = allowed_lateness_s
        self._buckets = buckets

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        buckets = self._buckets
        return (
            events
            | "KeyByIdBucketAndDay" >> beam.Map(lambda e: (dedup_key(e, buckets), e))
            | "DropRepeats" >> beam.ParDo(DropRepeatedEventIdsFn(self._allowed_lateness_s)))
