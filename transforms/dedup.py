"""Drop every repeat of an event_id, across bundles, files and hours of arrival.

Why buckets: the Python SDK pays a fixed cost per state key per bundle (its state cache
sizes each cached value, walking all loaded modules: ~4 ms here; see
docs/design.md#state-cost-per-key), so a ValueState per event_id costs ~1 ms per event.
Keying on a hash bucket of event_id bounds the keys a bundle touches to the bucket count,
whatever the traffic.

The rule (docs/correctness.md): the first copy of an event_id wins, every later copy
is a counted duplicate, whatever its bytes or event time. Streaming: first to arrive. A
bounded group has no arrival order: there the earliest event time wins.

Inside a bucket, ids are grouped by the UTC day of their copies' event times, so an
event-time timer can drop a day's ids once that day's windows are past the allowed
lateness, while the bucket stays one compact value.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
from typing import Any, NamedTuple, Tuple  # noqa: UP035 - Beam infers coders from typing.Tuple only

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.runners.worker.statecache import CacheAware
from apache_beam.transforms import trigger as triggers
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import (
    GlobalWindows,
    TimestampCombiner,
)
from apache_beam.utils import windowed_value
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas import GRANULARITY_MS, METRICS_NAMESPACE
from transforms.batching import BundleBatcher, EventBatch, in_global_window
from transforms.events import Event, decode_events, encode_events
from transforms.runtime import relax_gc
from transforms.timers import set_without_hold

DAY_MS = GRANULARITY_MS["day"]
# Few keys: the SDK's state cache walks all loaded modules (~5 ms) for every key it
# caches per bundle, so a bundle's fixed cost is about buckets × 5 ms. Raise it when a
# bucket-day would hold more than a few hundred thousand ids.
DEFAULT_BUCKETS = 32
PAST_HORIZON = "past_horizon"  # the dedup's output of events whose day it forgot

class SeenIds(dict, CacheAware):
    """UTC day index → the event_ids with a copy stamped that day.

    An id is held under the day of every copy that is later than its earlier ones, and
    looked up under every day held, so it is remembered until the horizon of its latest
    copy's day, whatever day its first copy was stamped.

    CacheAware: the SDK's state cache otherwise weighs a value by walking every object
    in it (objsize), measured at ~16% of a million-event run for these sets; the weight
    is estimated from the number of ids instead.
    """

    BYTES_PER_ID = 100  # a 32-character str and its set slot

    def __init__(self, days: Any = (), forgotten_through: int = -1) -> None:
        super().__init__(days)
        # The last day whose ids are forgotten: the watermark has passed its horizon.
        self.forgotten_through = forgotten_through

    def get_referents_for_cache(self) -> list:
        return []

    def __sizeof__(self) -> int:
        return dict.__sizeof__(self) + self.BYTES_PER_ID * sum(map(len, self.values()))

    def __reduce__(self):
        return SeenIds, (dict(self), self.forgotten_through)


def id_bucket(event_id: str, buckets: int) -> int:
    """A stable (cross-process, cross-run) hash bucket of an event_id."""
    return zlib.crc32(event_id.encode("utf-8")) % buckets


class BatchByBucketFn(beam.DoFn):
    """Per bundle, gathers events into one encoded batch per id bucket.

    The shuffle before the dedup step then moves one element per bucket and bundle
    instead of one per event: the DirectRunner's per-element shuffle cost (~50 µs an
    event, measured) was most of dedup's time. The batch is bytes, not a list of
    Events, because the SDK sizes grouped values with objsize, a walk over every object
    (measured: ~35 CPU-s per million events).
    """

    def __init__(self, buckets: int) -> None:
        self._buckets = buckets

    def start_bundle(self) -> None:
        self._batcher: BundleBatcher[int] = BundleBatcher()

    def process(self, events: EventBatch) -> Iterable[WindowedValue]:
        buckets, batcher = self._buckets, self._batcher
        for event in events:
            full = batcher.add(id_bucket(event.event_id, buckets), event)
            if full is not None:
                yield self._encoded(*full)

    def finish_bundle(self) -> Iterable[WindowedValue]:
        for batch in self._batcher.drain():
            yield self._encoded(*batch)

    @staticmethod
    def _encoded(bucket: int, events: list[Event], earliest: Timestamp) -> WindowedValue:
        return in_global_window((bucket, encode_events(events)), earliest)


def _as_batch(unique: Iterable[Event], windows: Any) -> Iterable[WindowedValue]:
    """The unique events as one element stamped with their earliest event time: one
    element for the group, not one per event (each hand-over to the next step cost the
    runner ~2.4 µs an event, py-spy, 1M events)."""
    batch = EventBatch(unique)
    if batch:
        earliest_ms = min(event.event_time_ms for event in batch)
        yield windowed_value.create(batch, earliest_ms * 1000, windows)


class _DropRepeatsFn(beam.DoFn):
    """Per bucket group: emits the first copy of each event_id, counts the others."""

    def __init__(self) -> None:
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicates")
        self._unique = Metrics.counter(METRICS_NAMESPACE, "unique")

    def setup(self) -> None:
        relax_gc()  # this step keeps every id of the open days alive

    def _count(self, unique: int, duplicates: int) -> None:
        self._unique.inc(unique)
        self._duplicates.inc(duplicates)


class DropRepeatsInGroupFn(_DropRepeatsFn):
    """Bounded input: a bucket's GroupByKey fires once with every copy in it, so the
    group alone decides; persisting its ids as state would pickle every id of the run
    for nothing (measured: the state commit was ~10% of a million-event run).

    A group has no arrival order (the runner may hand its values in any order), so of
    copies stamped differently the one with the earliest event time wins, ties broken
    by content: the same copy every run. It is the first to arrive whenever a re-stamp
    only moves forward (a client retry stamps the retry's time)."""

    def process(self, batch: tuple[int, Iterable[bytes]],
                input_value=beam.DoFn.WindowedValueParam) -> Iterable[WindowedValue]:
        first: dict[str, Event] = {}
        read = 0
        for event in itertools.chain.from_iterable(map(decode_events, batch[1])):
            read += 1
            held = first.setdefault(event.event_id, event)
            if held is not event and (event.event_time_ms, _content(event)) < (
                    held.event_time_ms, _content(held)):
                first[event.event_id] = event
        self._count(len(first), read - len(first))
        yield from _as_batch(first.values(), input_value.windows)


def _content(event: Event) -> bytes:
    return encode_events([event])


class DropRepeatedEventIdsFn(_DropRepeatsFn):
    """Unbounded input: the first copy to arrive wins. The ids seen so far live in
    state per bucket, by event day, until an event-time timer drops each day at its
    horizon (day end + allowed lateness). Held under its latest copy's day too, an id
    is remembered for at least the allowed lateness after the later of its copies'
    windows closes: a copy re-stamped across midnight is still a repeat.

    An event of a day its bucket already forgot cannot be told from a repeat, and its
    windows are past their horizon: it leaves on the PAST_HORIZON output (archived, counted as
    too late), never on the main one. Re-stamped to its event time there, it would be
    behind the watermark, yet ahead of it in the channel to the windows, which then
    count it: a record Kafka delivered again as the job drained was counted twice that
    way on Flink (docs/correctness.md#past-the-dedup-horizon).

    State is never changed in place: the value read may be the runner's cached,
    committed one, and a bundle that fails after the read is retried against it. Each
    firing writes a new SeenIds that shares the days it did not touch."""

    SEEN_IDS = ReadModifyWriteStateSpec("seen_ids", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, allowed_lateness_s: int) -> None:
        super().__init__()
        self._allowed_lateness_ms = allowed_lateness_s * 1000
        self._past_horizon = Metrics.counter(METRICS_NAMESPACE, "past_dedup_horizon")

    def _horizon(self, day: int) -> Timestamp:
        """When the day's last window closes for good: day end + allowed lateness."""
        return Timestamp(micros=((day + 1) * DAY_MS + self._allowed_lateness_ms) * 1000)

    def process(
        self,
        batch: tuple[int, Iterable[bytes]],
        input_value=beam.DoFn.WindowedValueParam,
        seen_state=beam.DoFn.StateParam(SEEN_IDS),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterable[WindowedValue | beam.pvalue.TaggedOutput]:
        held: SeenIds | None = seen_state.read()
        committed = held if held is not None else SeenIds()  # an empty one keeps a marker
        seen = SeenIds(committed, committed.forgotten_through)
        copied: set[int] = set()  # days whose id set this firing owns (copied)
        unique: list[Event] = []
        past_horizon: list[Event] = []
        duplicates = 0
        for event in itertools.chain.from_iterable(map(decode_events, batch[1])):
            event_id, day = event.event_id, event.event_time_ms // DAY_MS
            days_held = [d for d, ids in seen.items() if event_id in ids]
            if days_held:
                duplicates += 1
                if day <= max(days_held):
                    continue
            elif day <= seen.forgotten_through:
                past_horizon.append(event)
                continue
            else:
                unique.append(event)
            if day not in copied:
                seen[day] = set(seen.get(day, ()))
                copied.add(day)
            seen[day].add(event_id)
        self._count(len(unique) + len(past_horizon), duplicates)
        yield from _as_batch(unique, input_value.windows)
        if past_horizon:
            self._past_horizon.inc(len(past_horizon))
            for batch_past in _as_batch(past_horizon, input_value.windows):
                yield beam.pvalue.TaggedOutput(PAST_HORIZON, batch_past)
        if copied:
            seen_state.write(seen)
            if not committed or min(seen) < min(committed):
                set_without_hold(expiry, self._horizon(min(seen)))

    @on_timer(EXPIRY)
    def expire(self, fired_at=beam.DoFn.TimestampParam,
               seen_state=beam.DoFn.StateParam(SEEN_IDS),
               expiry=beam.DoFn.TimerParam(EXPIRY)) -> None:
        held: SeenIds | None = seen_state.read()
        seen = held if held is not None else SeenIds()
        forgotten = [day for day in seen if self._horizon(day) <= fired_at]
        kept = SeenIds(((day, ids) for day, ids in seen.items() if day not in forgotten),
                       max([seen.forgotten_through, *forgotten]))
        # Written even when no day is left: the marker outlives the ids, so a copy that
        # comes after its day was forgotten is not taken for a first one.
        seen_state.write(kept)
        if kept:
            set_without_hold(expiry, self._horizon(min(kept)))


class Deduplicated(NamedTuple):
    """The dedup's outputs: first copies for the windows, and events of days it had
    already forgotten (never repeats it knows; too late for every window they touch)."""

    unique: beam.PCollection
    past_horizon: beam.PCollection


class DeduplicateEvents(beam.PTransform):
    """EventBatches → the first copy of each event_id, as EventBatches (each stamped
    with its earliest event time; consumers read each event's own time), and apart,
    the events past the dedup horizon (streaming only; see DropRepeatedEventIdsFn).

    Events are batched per bucket (per bundle, then by a GroupByKey) before the stateful
    step, so state is read and written once per bucket per firing rather than once per
    event: the SDK's per-element state path measured ~50 µs/event here. Streaming fires
    as soon as a bucket has data (no latency beyond the bundle) and keeps the seen ids
    in state; a bounded run groups each bucket once, and that one group decides without
    state. Batches carry their earliest event time, so re-stamping each event with its
    own time never makes it late.
    """

    def __init__(self, allowed_lateness_s: int, buckets: int = DEFAULT_BUCKETS,
                 bounded: bool = False) -> None:
        super().__init__()
        self._allowed_lateness_s = allowed_lateness_s
        self._buckets = buckets
        self._bounded = bounded

    def expand(self, events: beam.PCollection) -> Deduplicated:
        batches = events | "BatchByBucket" >> beam.ParDo(
            BatchByBucketFn(self._buckets)).with_output_types(Tuple[int, bytes])  # noqa: UP006
        # A bounded run groups each bucket once in the default windowing, which the batch
        # runner groups without its trigger machinery (that was ~5% of a 1M-event run,
        # value by value). Its outputs are then stamped back to event times: no bounded
        # step downstream is windowed by timestamp (the metrics key by window).
        if not self._bounded:
            batches = batches | "FireEachBundle" >> beam.WindowInto(
                GlobalWindows(), trigger=triggers.Repeatedly(triggers.AfterCount(1)),
                accumulation_mode=triggers.AccumulationMode.DISCARDING,
                timestamp_combiner=TimestampCombiner.OUTPUT_AT_EARLIEST)
        drop_repeats = (DropRepeatsInGroupFn() if self._bounded
                        else DropRepeatedEventIdsFn(self._allowed_lateness_s))
        outputs = (
            batches
            | "GroupPerBucket" >> beam.GroupByKey()
            | "DropRepeats" >> beam.ParDo(drop_repeats).with_outputs(
                PAST_HORIZON, main="unique"))
        for output in (outputs.unique, outputs[PAST_HORIZON]):
            output.element_type = EventBatch
        return Deduplicated(outputs.unique, outputs[PAST_HORIZON])
