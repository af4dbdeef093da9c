"""Count the events that the windowing drops as too late, per window.

Windowing drops an element silently when it reaches a GroupByKey after the watermark has
passed its window's end + allowed lateness, and a DoFn cannot read the watermark to tell
which elements that will be. So this stage measures the loss instead of predicting it:

- every event is counted per window on a lossless path (the global window, where nothing
  is late), and
- the same per-window counts also go through the same fixed windows and allowed lateness
  as the metrics, and a GroupByKey that drops exactly what the metrics' GroupByKeys drop
  (the decision depends only on the window and the watermark);
- a stateful step per window adds up both, and once the watermark passes the window's
  lateness horizon (an event-time timer) reports the difference: the events that
  reached the archive but not the window.

Exact by construction: every event is counted once as seen, every kept event once as
kept, and every window's state is reconciled by its timer, so the reported total is
seen - kept, whatever the order in which the two paths arrive (a kept count that comes
after its window was reconciled opens the window again and corrects it, possibly with a
negative row). A window first seen after its horizon gets its timer behind the
watermark; it fires at once and reports all its events. Bounded input drops nothing,
so it reports nothing. Windows are decided in a sibling branch of the metrics, so an
element racing the watermark could, in principle, be dropped on one branch and not the
other; the window's report then differs from the metrics by that element.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple, Tuple  # noqa: UP035 - Beam infers coders from typing.Tuple

import apache_beam as beam
from apache_beam.coders import TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger as triggers
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas import GRANULARITY_MS as WINDOW_MS
from schemas import METRICS_NAMESPACE
from transforms.batching import EventBatch
from transforms.windowing import WindowIntoClosedIfNonEmpty

WindowKey = Tuple[str, int]  # noqa: UP006 - granularity, window start (epoch ms)
SeenKept = Tuple[int, int]  # noqa: UP006 - events seen (lossless), events kept (windowed)


class TooLate(NamedTuple):
    """A change in the number of events a window dropped (negative only to correct)."""

    granularity: str
    window_start: datetime
    events: int


class CountPerWindowFn(beam.DoFn):
    """Per bundle, one (granularity, window start) → event count per window touched.

    Each count carries the earliest event time it holds, so it falls into the same window
    (and is as late, or on time) as its events, like the metrics' per-bundle partials.
    """

    def __init__(self, granularities: Sequence[str]) -> None:
        self._sizes = [(g, WINDOW_MS[g]) for g in granularities]

    def start_bundle(self) -> None:
        self._counts: dict[WindowKey, int] = {}
        self._earliest_ms: dict[WindowKey, int] = {}

    def process(self, unique: EventBatch) -> None:
        counts, earliest = self._counts, self._earliest_ms
        for event in unique:
            t = event.event_time_ms
            for granularity, size in self._sizes:
                key = (granularity, t - t % size)
                n = counts.get(key)
                if n is None:
                    counts[key] = 1
                    earliest[key] = t
                else:
                    counts[key] = n + 1
                    if t < earliest[key]:
                        earliest[key] = t

    def finish_bundle(self) -> Iterable[WindowedValue]:
        for key, n in self._counts.items():
            yield WindowedValue((key, n), Timestamp(micros=self._earliest_ms[key] * 1000),
                                (GlobalWindow(),))
        self._counts = {}
        self._earliest_ms = {}


class ReconcileWindowFn(beam.DoFn):
    """Per window: seen and kept counts; at the lateness horizon, reports seen - kept."""

    COUNTS = ReadModifyWriteStateSpec("seen_kept", TupleCoder((VarIntCoder(), VarIntCoder())))
    HORIZON = TimerSpec("horizon", TimeDomain.WATERMARK)

    def __init__(self, allowed_lateness_s: int) -> None:
        self._allowed_lateness_ms = allowed_lateness_s * 1000
        self._too_late = {g: Metrics.counter(METRICS_NAMESPACE, f"too_late.{g}")
                          for g in WINDOW_MS}

    def process(self, keyed: tuple[WindowKey, SeenKept],
                counts=beam.DoFn.StateParam(COUNTS),
                horizon=beam.DoFn.TimerParam(HORIZON)) -> None:
        (granularity, start_ms), (seen, kept) = keyed
        current = counts.read()
        if current is None:
            current = (0, 0)
            # The windowing drops data once watermark > window end + allowed lateness;
            # a millisecond later that holds for sure.
            end_ms = start_ms + WINDOW_MS[granularity]
            horizon.set(Timestamp(micros=(end_ms + self._allowed_lateness_ms + 1) * 1000))
        counts.write((current[0] + seen, current[1] + kept))

    @on_timer(HORIZON)
    def reconcile(self, key=beam.DoFn.KeyParam,
                  counts=beam.DoFn.StateParam(COUNTS)) -> Iterable[TooLate]:
        current = counts.read()
        counts.clear()
        if current is None:
            return
        granularity, start_ms = key
        dropped = current[0] - current[1]
        if dropped:
            self._too_late[granularity].inc(dropped)
            yield TooLate(granularity, datetime.fromtimestamp(start_ms / 1000, tz=UTC),
                          dropped)


class CountTooLate(beam.PTransform):
    """Unique Events → TooLate rows per window (and `too_late.<granularity>` counters).

    Apply it to the same PCollection the metrics window, with the same allowed lateness;
    or to a pair (that PCollection, the dedup's past-horizon events), whose events the
    windows never see, so all of them count as too late.
    """

    def __init__(self, allowed_lateness_s: int,
                 granularities: Sequence[str] = ("hour", "day"),
                 bounded: bool = False) -> None:
        super().__init__()
        self._allowed_lateness_s = allowed_lateness_s
        self._granularities = tuple(granularities)
        self._bounded = bounded

    def expand(self, inputs: beam.PCollection | tuple[beam.PCollection, beam.PCollection]
               ) -> beam.PCollection:
        events, past_horizon = inputs if isinstance(inputs, tuple) else (inputs, None)
        counts = events | "CountPerWindow" >> beam.ParDo(
            CountPerWindowFn(self._granularities)).with_output_types(
                Tuple[WindowKey, int])  # noqa: UP006
        all_counts = counts
        if past_horizon is not None:
            all_counts = (counts, past_horizon | "CountPastHorizon" >> beam.ParDo(
                CountPerWindowFn(self._granularities)).with_output_types(
                    Tuple[WindowKey, int])) | "SeenAll" >> beam.Flatten()  # noqa: UP006
        seen = (all_counts
                | "SeenGlobal" >> beam.WindowInto(GlobalWindows())
                | "AsSeen" >> beam.MapTuple(lambda key, n: (key, (n, 0))
                                            ).with_output_types(Tuple[WindowKey, SeenKept]))  # noqa: UP006
        branches = [seen]
        trigger = (triggers.DefaultTrigger() if self._bounded
                   else triggers.AfterWatermark(late=triggers.AfterCount(1)))
        for granularity in self._granularities:
            kept = (
                counts
                | f"Only_{granularity}" >> beam.Filter(
                    lambda kv, g=granularity: kv[0][0] == g)
                | f"Window_{granularity}" >> WindowIntoClosedIfNonEmpty(
                    FixedWindows(WINDOW_MS[granularity] // 1000),
                    trigger=trigger,
                    accumulation_mode=triggers.AccumulationMode.DISCARDING,
                    allowed_lateness=Duration(seconds=self._allowed_lateness_s))
                | f"Kept_{granularity}" >> beam.CombinePerKey(sum)
                | f"KeptGlobal_{granularity}" >> beam.WindowInto(GlobalWindows())
                | f"AsKept_{granularity}" >> beam.MapTuple(
                    lambda key, n: (key, (0, n))
                ).with_output_types(Tuple[WindowKey, SeenKept]))  # noqa: UP006
            branches.append(kept)
        return (
            branches
            | "SeenAndKept" >> beam.Flatten()
            | "Reconcile" >> beam.ParDo(ReconcileWindowFn(self._allowed_lateness_s)
                                        ).with_output_types(TooLate))
