"""Turn accumulating panes into a retracting changelog with revisions and a final mark.

The Python SDK has no RETRACTING accumulation mode, so this stage builds it: per
(metric, dims, granularity, window) it remembers the last row it emitted, and before
each new value it emits that row again with sign -1. For every key and window,
sum(sign × value) over the changelog equals the latest value.

Timing is derived here, never taken from the runner's pane label (the
BundleBasedDirectRunner labels late panes EARLY, Prism labels early panes ON_TIME and
LATE: apache/beam#31438). This stage's own event-time timer at the window end says when
the watermark has passed it: values written before are EARLY; at the timer, each key's
value as of that moment is written once as ON_TIME (the upstream on-time pane holds the
watermark until it is processed, so it is in); every change after is LATE. A bounded
run's panes come when its input is complete: they are ON_TIME. The final mark comes
from an event-time timer at window end + allowed lateness: past it the windowing drops
data, so the value can no longer change. docs/correctness.md has the rules.

State is never changed in place: a runner's state cache can hand a retried bundle the
very object an earlier, failed attempt read, so every change is made to a copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
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
from schemas import METRICS_NAMESPACE
from transforms.metrics import MetricPane
from transforms.timers import set_without_hold

WindowKey = tuple[str, str]  # granularity, window_start (ISO, UTC)
MetricKey = tuple[str, str]  # metric, dims
# What the sinks held when the job was launched: their latest row per key, by window.
HeldRows = Mapping[WindowKey, Mapping[MetricKey, schemas.ChangelogRow]]

log = logging.getLogger("clickstream")


def _now() -> datetime:
    return datetime.now(UTC)


# Event time between a window's final mark and forgetting it: far beyond the moment a
# runner could still deliver a pane for it (Prism: just after the horizon timer).
CLEANUP_AFTER_S = 86_400


def window_key(granularity: str, window_start: datetime) -> WindowKey:
    return granularity, window_start.astimezone(UTC).isoformat()


def held_by_window(rows: Iterable[schemas.ChangelogRow]) -> dict[WindowKey, dict[
        MetricKey, schemas.ChangelogRow]]:
    """Latest rows read back from sinks (several sinks: the highest revision wins),
    grouped as the changelog stage keys its state."""
    held: dict[WindowKey, dict[MetricKey, schemas.ChangelogRow]] = {}
    for row in rows:
        window = held.setdefault(window_key(row["granularity"], row["window_start"]), {})
        key = (row["metric"], row["dims"])
        if key not in window or window[key]["revision"] < row["revision"]:
            window[key] = dict(row, sign=1)  # type: ignore[assignment]
    return held


def _timestamp(dt: datetime) -> Timestamp:
    return Timestamp(micros=int(dt.timestamp() * 1_000_000))


def classify_timing(watermark_passed: bool, on_time_written: bool) -> str:
    """EARLY before this stage saw the watermark pass the window end, then ON_TIME for
    the first value written, LATE for every change after it."""
    if not watermark_passed:
        return "EARLY"
    return "LATE" if on_time_written else "ON_TIME"


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


def on_time_revision_of(row: schemas.ChangelogRow, emitted_at: datetime
                        ) -> schemas.ChangelogRow:
    """The value as the watermark passed the window end: the next revision, ON_TIME."""
    return dict(row, revision=row["revision"] + 1,  # type: ignore[return-value]
                timing="ON_TIME", emitted_at=emitted_at)


class _WindowState:
    """What the changelog stage remembers per window, for all its metrics and dims:
    the last row written per key, the keys whose ON_TIME revision is written, whether
    the watermark passed the window end and whether the final mark is written."""

    __slots__ = ("finalized", "last", "seen_on_time", "watermark_passed")

    def __init__(self, watermark_passed: bool = False) -> None:
        self.last: dict[MetricKey, schemas.ChangelogRow] = {}
        self.seen_on_time: set[MetricKey] = set()
        self.watermark_passed = watermark_passed
        self.finalized = False

    @classmethod
    def taken_over(cls, rows: Mapping[MetricKey, schemas.ChangelogRow]) -> _WindowState:
        """A window an earlier run wrote, continued without its state: the sinks' rows
        become the last rows, so the next revision retracts them and goes above. Their
        pane_index is -1: this run's panes count from 0, and none is older than them.
        Not final: a run that still gets data for the window changes it."""
        state = cls(watermark_passed=any(r["timing"] != "EARLY" for r in rows.values()))
        state.last = {k: dict(r, pane_index=-1)  # type: ignore[misc]
                      for k, r in rows.items()}
        state.seen_on_time = {k for k, r in rows.items() if r["timing"] != "EARLY"}
        return state

    def copy(self) -> _WindowState:
        """A copy to change (rows are never changed in place, so sharing them is safe)."""
        new = _WindowState(self.watermark_passed)
        new.last = dict(self.last)
        new.seen_on_time = set(self.seen_on_time)
        new.finalized = self.finalized
        return new


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
                 cleanup_after_s: int | None = CLEANUP_AFTER_S,
                 bounded: bool = False, held: HeldRows | None = None) -> None:
        self._allowed_lateness_s = allowed_lateness_s
        self._bounded = bounded
        self._held = held or {}
        self._clock = clock
        self._cleanup_after_s = cleanup_after_s
        self._revisions = Metrics.counter(METRICS_NAMESPACE, "changelog_revisions")
        self._retractions = Metrics.counter(METRICS_NAMESPACE, "changelog_retractions")
        self._finalized = Metrics.counter(METRICS_NAMESPACE, "windows_finalized")
        self._unchanged = Metrics.counter(METRICS_NAMESPACE, "panes_unchanged")
        self._out_of_order = Metrics.counter(METRICS_NAMESPACE, "panes_out_of_order")
        self._after_final = Metrics.counter(METRICS_NAMESPACE, "panes_after_final")
        self._forgotten = Metrics.counter(METRICS_NAMESPACE, "windows_forgotten")
        self._without_state = Metrics.counter(METRICS_NAMESPACE,
                                              "windows_relaunched_without_state")

    def process(
        self,
        keyed: tuple[WindowKey, MetricPane],
        state=beam.DoFn.StateParam(STATE),
        window_end_timer=beam.DoFn.TimerParam(WINDOW_END),
        horizon_timer=beam.DoFn.TimerParam(HORIZON),
    ) -> Iterable[schemas.ChangelogRow]:
        window, pane = keyed
        held: _WindowState | None = state.read()
        if held is not None:
            current = held.copy()
        else:
            # Bounded input is complete before any pane: its watermark is past every end.
            current = (self._take_over(window) if window in self._held
                       else _WindowState(watermark_passed=self._bounded))
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
        timing = classify_timing(current.watermark_passed,
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
        if pane.sketch is not None:
            new["sketch"] = pane.sketch
        if current.finalized:
            # A pane after the final mark (Prism can deliver one after the horizon timer
            # of a bounded run): it continues the revisions and stays final.
            self._after_final.inc()
        yield from self._replace(last, new)
        current.last[key] = new
        state.write(current)

    def _take_over(self, window: WindowKey) -> _WindowState:
        rows = self._held[window]
        self._without_state.inc()
        log.warning(
            "no state for %s window %s, which the sinks already hold (revisions up to %d): "
            "the job was relaunched without its state. Its revisions continue above "
            "the sinks' and retract them, but its values count only the events this run "
            "reads; run `clickstream finalize --date %s` after the day's lateness "
            "horizon to recompute the window exactly.", window[0], window[1],
            max(r["revision"] for r in rows.values()), window[1][:10])
        return _WindowState.taken_over(rows)

    @on_timer(WINDOW_END)
    def watermark_passed_window_end(self, state=beam.DoFn.StateParam(STATE)
                                    ) -> Iterable[schemas.ChangelogRow]:
        held: _WindowState | None = state.read()
        if held is None:
            return
        current = held.copy()
        yield from self._pass_window_end(current)
        state.write(current)

    def _pass_window_end(self, current: _WindowState) -> Iterable[schemas.ChangelogRow]:
        """The watermark is past the window end: each key's value as of now, once, as
        ON_TIME (unless the window is final already)."""
        if current.watermark_passed or current.finalized:
            current.watermark_passed = True
            return
        current.watermark_passed = True
        emitted_at = self._clock()
        for key, last in list(current.last.items()):
            if key in current.seen_on_time:
                continue
            on_time = on_time_revision_of(last, emitted_at)
            yield from self._replace(last, on_time)
            current.last[key] = on_time
            current.seen_on_time.add(key)

    @on_timer(HORIZON)
    def finalize(self, fired_at=beam.DoFn.TimestampParam,
                 state=beam.DoFn.StateParam(STATE),
                 cleanup_timer=beam.DoFn.TimerParam(CLEANUP),
                 ) -> Iterable[schemas.ChangelogRow]:
        held: _WindowState | None = state.read()
        if held is None:
            return
        current = held.copy()
        if self._cleanup_after_s is not None:
            set_without_hold(cleanup_timer, fired_at + self._cleanup_after_s)
        # A watermark that jumps past the window end and the horizon at once (a runner
        # catching up, a bundle spanning both) fires both timers together, in no set
        # order: the on-time step comes first whichever fired first.
        yield from self._pass_window_end(current)
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
        current.watermark_passed = True
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
    Prism delivers late must still find the window's revisions). `held`: what the sinks
    held at launch (held_by_window); a window found there but not in state was written
    by an earlier run whose state this one lacks: it is continued above the sinks'
    revisions, counted (windows_relaunched_without_state) and logged.
    """

    def __init__(self, allowed_lateness_s: int,
                 clock: Callable[[], datetime] = _now, bounded: bool = False,
                 held: HeldRows | None = None) -> None:
        super().__init__()
        self._held = held
        self._allowed_lateness_s = allowed_lateness_s
        self._clock = clock
        self._cleanup_after_s = None if bounded else CLEANUP_AFTER_S
        self._bounded = bounded

    def expand(self, panes: beam.PCollection) -> beam.PCollection:
        return (
            panes
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "KeyByWindow" >> beam.Map(
                lambda p: (window_key(p.granularity, p.window_start), p)
            ).with_output_types(Tuple[Tuple[str, str], Any])  # noqa: UP006 - a str key
            | "EmitRetractions" >> beam.ParDo(
                EmitRetractionsFn(self._allowed_lateness_s, self._clock,
                                  self._cleanup_after_s, self._bounded, self._held)))
