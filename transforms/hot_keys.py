"""Hot keys: which devices (or users) take a large share of the traffic, and an optional
policy that sets apart the events of a device sending beyond a rate.

DetectHotKeys keeps a heavy-hitters sketch (Apache DataSketches frequent items) per
event-time window of the unique events and reports the keys above a share: a gauge
`hot_key_share.<dimension>.<key>` in parts per million (pipeline/exporter.py exports it
as clickstream_hot_key_share), a log line, and a HotKeyReport element. Sketches are
built per bundle and merged per window, so a key with 30% of the traffic costs no more
than any other: nothing here is keyed by device.

BotPolicy is the optional fix for one kind of hot key, automation: in each window of
`window_s` seconds, a device with more than `max_events` unique events is suspected
automation, and all its events of that window leave the counted stream for the dead
letter (reason `suspected_automation`, the event as JSON, the count in `detail`),
counted by `suspected_bot`. Nothing is dropped: read = unique + duplicates + dead letter
still holds, and unique = counted + suspected_bot.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import apache_beam as beam
import datasketches
import orjson
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger
from apache_beam.transforms.window import (
    FixedWindows,
    GlobalWindow,
    GlobalWindows,
    TimestampedValue,
)
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import schemas
from transforms.events import Event, EventBatch
from transforms.windowing import WindowIntoClosedIfNonEmpty

log = logging.getLogger("clickstream")
METRICS_NAMESPACE = "clickstream"
HOT_KEY_GAUGE_PREFIX = "hot_key_share."
SHARE_SCALE = 1_000_000  # gauges hold integers: shares go out in parts per million
SUSPECTED_AUTOMATION = "suspected_automation"
DIMENSIONS: dict[str, Callable[[Event], str]] = {
    "device_id": lambda e: e.device_id,
    "identity": lambda e: e.identity,
}


class HotKey(NamedTuple):
    key: str
    share: float  # estimated count / window total
    lower: int  # the sketch's bounds on the key's count
    upper: int


class HotKeyReport(NamedTuple):
    dimension: str
    window_start_s: int
    total: int
    keys: tuple[HotKey, ...]  # share >= the reporting share, largest first


class FrequentKeys:
    """A DataSketches frequent-strings sketch that pickles (Beam encodes accumulators
    by pickling; the sketch itself has only serialize())."""

    def __init__(self, lg_max_k: int, sketch: Any = None) -> None:
        self.lg_max_k = lg_max_k
        self.sketch = sketch if sketch is not None else \
            datasketches.frequent_strings_sketch(lg_max_k)

    def __reduce__(self) -> tuple[Any, tuple[int, bytes]]:
        return _frequent_keys, (self.lg_max_k, self.sketch.serialize())


def _frequent_keys(lg_max_k: int, serialized: bytes) -> FrequentKeys:
    return FrequentKeys(lg_max_k, datasketches.frequent_strings_sketch.deserialize(serialized))


# Made once: GlobalWindow() computes its end timestamp from a proto on every call (most
# of this stage's cost per output, cProfile).
_GLOBAL_WINDOWS = (GlobalWindow(),)


class SketchPerBundleFn(beam.DoFn):
    """Per bundle, one sketch per (dimension, window) of the events' keys, stamped with
    the earliest event time it holds (so it lands in that window, as on time or late)."""

    def __init__(self, dimensions: Sequence[str], window_s: int, lg_max_k: int) -> None:
        self._dimensions = tuple(dimensions)
        self._window_ms = window_s * 1000
        self._lg_max_k = lg_max_k

    def start_bundle(self) -> None:
        self._counts: dict[tuple[str, int], Counter[str]] = {}
        self._earliest: dict[tuple[str, int], int] = {}

    def process(self, batch: EventBatch) -> None:
        for event in batch:
            t = event.event_time_ms
            window = t - t % self._window_ms
            for dimension in self._dimensions:
                slot = (dimension, window)
                counts = self._counts.get(slot)
                if counts is None:
                    counts = self._counts[slot] = Counter()
                    self._earliest[slot] = t
                elif t < self._earliest[slot]:
                    self._earliest[slot] = t
                counts[DIMENSIONS[dimension](event)] += 1

    def finish_bundle(self) -> Iterable[WindowedValue]:
        for (dimension, _window), counts in self._counts.items():
            keys = FrequentKeys(self._lg_max_k)
            for key, n in counts.items():
                keys.sketch.update(key, n)
            earliest = self._earliest[(dimension, _window)]
            yield WindowedValue((dimension, keys), Timestamp(micros=earliest * 1000),
                                _GLOBAL_WINDOWS)
        self._counts, self._earliest = {}, {}


class MergeSketchesFn(beam.CombineFn):
    def __init__(self, lg_max_k: int) -> None:
        self._lg_max_k = lg_max_k

    def create_accumulator(self) -> FrequentKeys:
        return FrequentKeys(self._lg_max_k)

    def add_input(self, acc: FrequentKeys, keys: FrequentKeys) -> FrequentKeys:
        acc.sketch.merge(keys.sketch)
        return acc

    def merge_accumulators(self, accs: Iterable[FrequentKeys]) -> FrequentKeys:
        accs = iter(accs)
        merged = next(accs)
        for acc in accs:
            merged.sketch.merge(acc.sketch)
        return merged

    def extract_output(self, acc: FrequentKeys) -> FrequentKeys:
        return acc


def top_keys(keys: FrequentKeys, min_share: float, top: int) -> tuple[int, list[HotKey]]:
    """(total, keys whose estimated share is at least min_share, largest first). With
    NO_FALSE_NEGATIVES every key whose true count reaches min_share × total is listed."""
    total = keys.sketch.total_weight
    if total == 0:
        return 0, []
    threshold = int(min_share * total)
    items = keys.sketch.get_frequent_items(
        datasketches.frequent_items_error_type.NO_FALSE_NEGATIVES, threshold)
    hot = [HotKey(item, estimate / total, lower, upper)
           for item, estimate, lower, upper in items if upper >= min_share * total]
    return total, sorted(hot, key=lambda k: (-k.share, k.key))[:top]


class ReportHotKeysFn(beam.DoFn):
    """A window's merged sketch → gauges, a log line and a HotKeyReport."""

    def __init__(self, min_share: float, top: int, min_events: int) -> None:
        self._min_share = min_share
        self._top = top
        self._min_events = min_events

    def process(self, keyed: tuple[str, FrequentKeys],
                window=beam.DoFn.WindowParam) -> Iterable[HotKeyReport]:
        dimension, keys = keyed
        total, hot = top_keys(keys, self._min_share, self._top)
        if not hot or total < self._min_events:
            return
        for key in hot:
            Metrics.gauge(METRICS_NAMESPACE, f"{HOT_KEY_GAUGE_PREFIX}{dimension}.{key.key}"
                          ).set(int(key.share * SHARE_SCALE))
        start = int(window.start)
        log.info("hot keys by %s in the window from %s (%d events): %s", dimension,
                 datetime.fromtimestamp(start, tz=UTC).isoformat(), total,
                 ", ".join(f"{k.key} {k.share:.1%}" for k in hot))
        yield HotKeyReport(dimension, start, total, tuple(hot))


@dataclass(frozen=True)
class HotKeyConfig:
    window_s: int = 60
    min_share: float = 0.05  # report keys with at least this share of a window
    top: int = 10
    lg_max_k: int = 10  # sketch of up to 2^10 counters: share error ≤ ~0.35%
    # A window with fewer events reports nothing: in a trickle every device is "hot",
    # and each reported key is a gauge the job keeps for good.
    min_events: int = 1000
    dimensions: tuple[str, ...] = ("device_id",)


class DetectHotKeys(beam.PTransform):
    """Unique EventBatches → HotKeyReports per window and dimension (and the
    `hot_key_share.*` gauges)."""

    def __init__(self, config: HotKeyConfig = HotKeyConfig()) -> None:
        super().__init__()
        unknown = set(config.dimensions) - set(DIMENSIONS)
        if unknown:
            raise ValueError(f"hot-key dimensions {sorted(unknown)} unknown; "
                             f"choose from {sorted(DIMENSIONS)}")
        self._config = config

    def expand(self, unique: beam.PCollection) -> beam.PCollection:
        c = self._config
        return (unique
                | "SketchPerBundle" >> beam.ParDo(
                    SketchPerBundleFn(c.dimensions, c.window_s, c.lg_max_k))
                | "Window" >> beam.WindowInto(FixedWindows(c.window_s))
                | "MergePerWindow" >> beam.CombinePerKey(MergeSketchesFn(c.lg_max_k))
                | "Report" >> beam.ParDo(ReportHotKeysFn(c.min_share, c.top, c.min_events)))


# --- the bot policy ------------------------------------------------------------------

class SplitByDeviceWindowFn(beam.DoFn):
    """A batch → one ((device, window start ms), events) per device and window in it,
    stamped with its earliest event time."""

    def __init__(self, window_s: int) -> None:
        self._window_ms = window_s * 1000

    def process(self, batch: EventBatch) -> Iterable[TimestampedValue]:
        groups: dict[tuple[str, int], EventBatch] = {}
        for event in batch:
            t = event.event_time_ms
            groups.setdefault((event.device_id, t - t % self._window_ms),
                              EventBatch()).append(event)
        for key, events in groups.items():
            earliest = min(e.event_time_ms for e in events)
            yield TimestampedValue((key, events), earliest / 1000)


class ApplyBotPolicyFn(beam.DoFn):
    """A device's events of one window (one pane) → kept as an EventBatch, or, beyond
    the limit, every one of them to the dead letter as suspected automation."""

    def __init__(self, max_events: int, clock: Callable[[], float]) -> None:
        self._max_events = max_events
        self._clock = clock
        self._suspected = Metrics.counter(METRICS_NAMESPACE, "suspected_bot")

    def process(self, keyed: tuple[tuple[str, int], Iterable[EventBatch]]) -> Iterable[Any]:
        (device, window_ms), batches = keyed
        events = EventBatch(e for batch in batches for e in batch)
        if len(events) <= self._max_events:
            yield events
            return
        self._suspected.inc(len(events))
        detail = (f"device {device} sent {len(events)} events in the "
                  f"{datetime.fromtimestamp(window_ms / 1000, tz=UTC).isoformat()} window "
                  f"(limit {self._max_events})")
        ingest = datetime.fromtimestamp(self._clock(), tz=UTC)
        for event in events:
            yield beam.pvalue.TaggedOutput(SUSPECTED_AUTOMATION, dead_letter_of(
                event, detail, ingest))


def dead_letter_of(event: Event, detail: str, ingest_time: datetime) -> schemas.DeadLetterRow:
    payload = orjson.dumps(event._asdict(), option=orjson.OPT_SORT_KEYS)
    return {"dead_letter_id": f"{SUSPECTED_AUTOMATION}-{event.event_id}"[:200],
            "payload": payload, "reason": SUSPECTED_AUTOMATION, "detail": detail,
            "ingest_time": ingest_time}


class BotPolicy(beam.PTransform):
    """Unique EventBatches → (kept EventBatches, dead-letter rows of suspected
    automation): devices above `max_events` per `window_s` window are set apart.

    Grouped by (device, window): a 30% bot is one large group, which only this optional
    stage pays for. Late events of a device-window are judged as their own pane (a late
    pane holds only what arrived late). `allowed_lateness_s` must cover the metrics'
    (events later than that never reach the metrics either)."""

    def __init__(self, max_events: int, window_s: int, allowed_lateness_s: int,
                 clock: Callable[[], float]) -> None:
        super().__init__()
        self._max_events = max_events
        self._window_s = window_s
        self._allowed_lateness_s = allowed_lateness_s
        self._clock = clock

    def expand(self, unique: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        judged = (unique
                  | "SplitByDeviceWindow" >> beam.ParDo(SplitByDeviceWindowFn(self._window_s))
                  | "Window" >> WindowIntoClosedIfNonEmpty(
                      FixedWindows(self._window_s),
                      trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                      accumulation_mode=trigger.AccumulationMode.DISCARDING,
                      allowed_lateness=self._allowed_lateness_s)
                  | "GroupDeviceWindow" >> beam.GroupByKey()
                  | "Judge" >> beam.ParDo(ApplyBotPolicyFn(self._max_events, self._clock)
                                          ).with_outputs(SUSPECTED_AUTOMATION, main="kept"))
        kept = judged["kept"] | "KeptToGlobalWindow" >> beam.WindowInto(GlobalWindows())
        kept.element_type = EventBatch
        suspected = judged[SUSPECTED_AUTOMATION] | "SuspectedToGlobalWindow" >> \
            beam.WindowInto(GlobalWindows())
        return kept, suspected
