"""Turn accumulating panes into a retracting changelog with revisions and a final mark.

The Python SDK has no RETRACTING accumulation mode, so this stage builds it: per
(metric, dims, granularity, window) it remembers the last row it emitted, and before
each new value it emits that row again with sign -1. For every key and window,
sum(sign × value) over the changelog equals the latest value.

Timing is derived here rather than trusted from the runner (docs/design.md#late-trigger-stall:
the BundleBasedDirectRunner labels late panes EARLY): once the watermark has passed the
window end, or an ON_TIME/LATE pane was seen, every later pane is LATE. The final mark
comes from an event-time timer at window end + allowed lateness: past it the windowing
drops data, so the value can no longer change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Tuple  # noqa: UP035 - Beam reads typing.Tuple hints

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp

import schemas
from transforms.metrics import MetricPane

METRICS_NAMESPACE = "clickstream"

WindowKey = tuple[str, str]  # granularity, window_start (ISO)
MetricKey = tuple[str, str]  # metric, dims


def _now() -> datetime:
    return datetime.now(UTC)


# Event time between a window's final mark and forgetting it: far beyond the moment a
# runner could still deliver a pane for it (Prism: just after the horizon timer).
CLEANUP_AFTER_S = 86_400


def _timestamp(dt: datetime) -> Timestamp:
    return Timestamp(micros=int(dt.timestamp() * 1_000_000))


def classify_timing(runner_timing: str, watermark_passed: bool, seen_on_time: bool) -> str:
    """EARLY, ON_TIME or LATE, whatever label the runner put on the pane."""
    if seen_on_time:
        return "LATE"
    if runner_timing in ("ON_TIME", "LATE"):
        return runner_timing
    return "ON_TIME" if watermark_passed else "EARLY"


def retraction_of(row: schemas.ChangelogRow, emitted_at: datetime) -> schemas.ChangelogRow:
    """The row again with sign -1: it cancels `row` in sum(sign × value). It keeps the
    row's revision (the changelog key is revision *and* sign), so each revision is
    retracted at most once, whichever job writes the retraction."""
    return dict(row, sign=-1, emitted_at=emitted_at)  # type: ignore[return-value]


def final_revision_of(row: schemas.ChangelogRow, emitted_at: datetime
                      ) -> schemas.ChangelogRow:
    """The final mark: the same value at the next revision with is_final set."""
    return dict(row, revision=row["revision"] + 1,  # type: ignore[return-value]
                is_final=True, emitted_at=emitted_at)


class _WindowState:
    """What the changelog stage remembers per window, for all its metrics and dims."""

    __slots__ = ("finalized", "last", "seen_on_time", "watermark_passed")

    def __init__(self) -> None:
        self.last: dict[MetricKey, schemas.ChangelogRow] = {}
        self.seen_on_time: set[MetricKey] = set()
        self.watermark_passed = False
        self.finalized = False


class EmitRetractionsFn(beam.DoFn):
    """Per window: a -old/+new pair for each changed value, then a final revision.

    Keyed by window rather than by (metric, dims, window): the SDK's state cost is per
    key per bundle, and a window's metrics fire together.
    """

    STATE = ReadModifyWriteStateSpec("window_state", PickleCoder())
    WINDOW_END = TimerSpec("window_end", TimeDomain.WATERMARK)
    HORIZON = TimerSpec("horizon", TimeDomain.WATERMARK)
    CLEANUP = TimerSpec("cleanup", TimeDomain.WATERMARK)

    def __init__(self, allowed_lateness_s: int, clock: Callable[[], datetime] = _now,
                 cleanup_after_s: int | None = CLEANUP_AFTER_S) -> None:
        self._allowed_lateness_s = allowed_lateness_s
        self._clock = clock
        self._cleanup_after_s = cleanup_after_s
        self._revisions = Metrics.counter(METRICS_NAMESPACE, "changelog_revisions")
        self._retractions = Metrics.counter(METRICS_NAMESPACE, "changelog_retractions")
        self._finalized = Metrics.counter(METRICS_NAMESPACE, "windows_finalized")
        self._unchanged = Metrics.counter(METRICS_NAMESPACE, "panes_unchanged")
        self._out_of_order = Metrics.counter(METRICS_NAMESPACE, "panes_out_of_order")
        self._after_final = Metrics.counter(METRICS_NAMESPACE, "panes_after_final")
        self._forgotten = Metrics.counter(METRICS_NAMESPACE, "windows_forgotten")

    def process(
        self,
        keyed: tuple[WindowKey, MetricPane],
        state=beam.DoFn.StateParam(STATE),
        window_end_timer=beam.DoFn.TimerParam(WINDOW_END),
        horizon_timer=beam.DoFn.TimerParam(HORIZON),
    ) -> Iterable[schemas.ChangelogRow]:
        _, pane = keyed
        current: _WindowState | None = state.read()
        if current is None:
            current = _WindowState()
            end = _timestamp(pane.window_end)
            window_end_timer.set(end)
            horizon_timer.set(end + self._allowed_lateness_s)
        key = (pane.metric, pane.dims)
        last = current.last.get(key)
        if last is not None and pane.pane_index < last["pane_index"]:
            # Once re-windowed, a window's panes may arrive in any order (Prism reorders
            # them). Panes accumulate, so an older one has nothing new, and emitting it
            # would move the value back.
            self._out_of_order.inc()
            return
        timing = classify_timing(pane.runner_timing, current.watermark_passed,
                                 key in current.seen_on_time or current.finalized)
        if timing in ("ON_TIME", "LATE"):
            current.seen_on_time.add(key)
        if last is not None and last["value"] == pane.value and (
                last["timing"] == timing or timing == "LATE"):
            # Nothing new for consumers: same value, and not the first on-time pane.
            # (Prism closes a bounded window with a LATE pane repeating the on-time one.)
            self._unchanged.inc()
            state.write(current)
            return
        new: schemas.ChangelogRow = {
            "metric": pane.metric,
            "dims": pane.dims,
            "granularity": pane.granularity,
            "window_start": pane.window_start,
            "window_end": pane.window_end,
            "value": pane.value,
            "sign": 1,
            "revision": 1 if last is None else last["revision"] + 1,
            "pane_index": pane.pane_index,
            "timing": timing,
            "is_final": current.finalized,
            "emitted_at": self._clock(),
        }
        if current.finalized:
            # A pane after the final mark (Prism can deliver one after the horizon timer
            # of a bounded run): it continues the revisions and stays final.
            self._after_final.inc()
        yield from self._replace(last, new)
        current.last[key] = new
        state.write(current)

    @on_timer(WINDOW_END)
    def watermark_passed_window_end(self, state=beam.DoFn.StateParam(STATE)) -> None:
        current: _WindowState | None = state.read()
        if current is not None:
            current.watermark_passed = True
            state.write(current)

    @on_timer(HORIZON)
    def finalize(self, fired_at=beam.DoFn.TimestampParam,
                 state=beam.DoFn.StateParam(STATE),
                 cleanup_timer=beam.DoFn.TimerParam(CLEANUP),
                 ) -> Iterable[schemas.ChangelogRow]:
        current: _WindowState | None = state.read()
        if current is None:
            return
        if self._cleanup_after_s is not None:
            cleanup_timer.set(fired_at + self._cleanup_after_s)
        emitted_at = self._clock()
        for key, last in list(current.last.items()):
            final = final_revision_of(last, emitted_at)
            self._finalized.inc()
            yield from self._replace(last, final)
            current.last[key] = final
        # Kept until the cleanup timer, not cleared now: a pane that still arrives (Prism
        # delivered one after this timer) must continue the revisions, not restart them
        # at 1 where the sinks' keyed writes would drop it.
        current.finalized = True
        current.seen_on_time.clear()
        state.write(current)

    @on_timer(CLEANUP)
    def forget_window(self, state=beam.DoFn.StateParam(STATE)) -> None:
        """Long after the horizon no pane can arrive (the windowing drops its data), so
        the window's rows can go: without this, state grows by every window forever."""
        self._forgotten.inc()
        state.clear()

    def _replace(self, last: schemas.ChangelogRow | None, new: schemas.ChangelogRow
                 ) -> Iterable[schemas.ChangelogRow]:
        if last is not None:
            self._retractions.inc()
            yield retraction_of(last, new["emitted_at"])
        self._revisions.inc()
        yield new


class RetractingChangelog(beam.PTransform):
    """MetricPanes (any windowing) → changelog rows in the global window.

    Unbounded input drops a window's state `CLEANUP_AFTER_S` of event time after its
    horizon; a bounded run ends instead (its timers all fire at the end, where a pane
    Prism delivers late must still find the window's revisions).
    """

    def __init__(self, allowed_lateness_s: int,
                 clock: Callable[[], datetime] = _now, bounded: bool = False) -> None:
        super().__init__()
        self._allowed_lateness_s = allowed_lateness_s
        self._clock = clock
        self._cleanup_after_s = None if bounded else CLEANUP_AFTER_S

    def expand(self, panes: beam.PCollection) -> beam.PCollection:
        return (
            panes
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "KeyByWindow" >> beam.Map(
                lambda p: ((p.granularity, p.window_start.isoformat()), p)
            ).with_output_types(Tuple[Tuple[str, str], Any])  # noqa: UP006 - a str key
            | "EmitRetractions" >> beam.ParDo(
                EmitRetractionsFn(self._allowed_lateness_s, self._clock,
                                  self._cleanup_after_s)))
