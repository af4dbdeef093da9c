"""Correct a sink's windows to a recomputed, exact value: the diff as changelog rows.

The daily finalize job recomputes a day from the raw archive and hands this stage, per
(metric, dims, granularity, window_start), the recomputed value and the row the sink
holds as latest (its +1 changelog row at the latest revision). What comes out is
appended to the changelog like any streaming revision, so consumers need nothing new:

- value differs (or only one side has the key; a missing recomputed value is 0): the
  held row retracted (sign -1, at its own revision, as the streaming stage retracts)
  and the new value at revision + 1, timing BATCH, final;
- same value, not final yet: the final mark, exactly as the streaming stage's horizon
  timer writes it (retraction, then the same row at revision + 1 with is_final; its
  timing stays what it was: nothing changed, so it is not a BATCH row);
- same value and final: nothing. That makes a second finalize of the same archive write
  nothing at all.

So sum(sign × value) per key and window stays equal to the latest value, and every
window the day has ends final.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Tuple  # noqa: UP035 - Beam reads typing.Tuple hints

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

import schemas
from schemas import METRICS_NAMESPACE
from transforms.metrics import MetricPane
from transforms.retract import final_revision_of, retraction_of

WindowKey = tuple[str, str, str, str]  # metric, dims, granularity, window_start (ISO, UTC)


_Keyed = Tuple[Tuple[str, str, str, str], Any]  # noqa: UP006


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def pane_key(pane: MetricPane) -> WindowKey:
    return (pane.metric, pane.dims, pane.granularity, _iso(pane.window_start))


def row_key(row: schemas.ChangelogRow) -> WindowKey:
    return (row["metric"], row["dims"], row["granularity"], _iso(row["window_start"]))


def correction_rows(held: schemas.ChangelogRow | None, recomputed: MetricPane | None,
                    emitted_at: datetime) -> list[schemas.ChangelogRow]:
    """The changelog rows that take one window from `held` to `recomputed` (see the
    module docstring). Either may be None: no row in the sink, or no events in the
    recompute."""
    if held is None and recomputed is None:
        return []
    value = recomputed.value if recomputed is not None else 0
    if held is not None and held["value"] == value:
        if held["is_final"]:
            return []
        return [retraction_of(held, emitted_at), final_revision_of(held, emitted_at)]
    if held is None:
        assert recomputed is not None
        new: schemas.ChangelogRow = {
            "metric": recomputed.metric,
            "dims": recomputed.dims,
            "granularity": recomputed.granularity,
            "window_start": recomputed.window_start,
            "window_end": recomputed.window_end,
            "value": value,
            "sign": 1,
            "revision": 1,
            "pane_index": 0,
            "timing": schemas.BATCH_TIMING,
            "is_final": True,
            "emitted_at": emitted_at,
        }
        if recomputed.sketch is not None:
            new["sketch"] = recomputed.sketch
        return [new]
    # pane_index stays the last streaming pane's: the recompute is no pane of the
    # streaming windows, and the index never moves backwards for a consumer.
    corrected: schemas.ChangelogRow = dict(  # type: ignore[assignment]
        held, value=value, revision=held["revision"] + 1, timing=schemas.BATCH_TIMING,
        is_final=True, emitted_at=emitted_at)
    if recomputed is not None and recomputed.sketch is not None:
        corrected["sketch"] = recomputed.sketch
    elif "sketch" in corrected:
        corrected["sketch"] = None  # the held sketch counts the old value: blank it
    return [retraction_of(held, emitted_at), corrected]


class CorrectWindowsFn(beam.DoFn):
    """(window key, {"recomputed": panes, "held": rows}) → correction changelog rows."""

    def __init__(self, clock: Callable[[], datetime] = utc_now,
                 counter_suffix: str = "") -> None:
        self._clock = clock

        def counter(name: str) -> Any:
            return Metrics.counter(METRICS_NAMESPACE, name + counter_suffix)

        self._corrected = counter("finalize_windows_corrected")
        self._marked_final = counter("finalize_windows_marked_final")
        self._already_final = counter("finalize_windows_already_final")
        self._retracted = counter("finalize_keys_only_in_sink")
        self._added = counter("finalize_keys_only_in_archive")

    def process(self, grouped: tuple[WindowKey, dict[str, Sequence[Any]]]
                ) -> Iterable[schemas.ChangelogRow]:
        _, sides = grouped
        # One of each is expected; if a reader or runner repeats one, the newest wins.
        held = max(sides["held"], key=lambda r: r["revision"], default=None)
        recomputed = max(sides["recomputed"], key=lambda p: p.pane_index, default=None)
        rows = correction_rows(held, recomputed, self._clock())
        if not rows:
            self._already_final.inc()
        elif rows[-1]["timing"] == schemas.BATCH_TIMING:
            self._corrected.inc()
            if recomputed is None:
                self._retracted.inc()
            if held is None:
                self._added.inc()
        else:
            self._marked_final.inc()
        yield from rows


class ReadHeldRows(beam.PTransform):
    """PBegin → what one sink holds: its latest ChangelogRow (sign +1) per key, for
    windows starting in [start, end). `read(start, end)` is the sink's own reader; it
    runs when the pipeline runs, so the snapshot is as fresh as the corrections."""

    def __init__(self, read: Callable[[datetime, datetime], Iterable[schemas.ChangelogRow]],
                 start: datetime, end: datetime) -> None:
        super().__init__()
        self._read = read
        self._bounds = (start, end)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        read = self._read
        return (pbegin
                | "Range" >> beam.Create([self._bounds])
                | "ReadLatest" >> beam.FlatMap(lambda bounds: read(*bounds)))


class CorrectChangelog(beam.PTransform):
    """(recomputed MetricPanes, one sink's held latest ChangelogRows) → the correction
    changelog rows for that sink. `counter_suffix` tells sinks' counters apart."""

    def __init__(self, clock: Callable[[], datetime] = utc_now,
                 counter_suffix: str = "") -> None:
        super().__init__()
        self._clock = clock
        self._counter_suffix = counter_suffix

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]
               ) -> beam.PCollection:
        recomputed, held = inputs
        return (
            {
                # Typed keys: the join needs a deterministic key coder. The panes come in
                # their metric windows, the sink's rows in the global one: a join needs
                # one windowing, and the window is in the key already.
                "recomputed": recomputed
                | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
                | "KeyRecomputed" >> beam.Map(
                    lambda p: (pane_key(p), p)).with_output_types(_Keyed),
                "held": held | "KeyHeld" >> beam.Map(
                    lambda r: (row_key(r), r)).with_output_types(_Keyed),
            }
            | "JoinByWindow" >> beam.CoGroupByKey()
            | "Correct" >> beam.ParDo(CorrectWindowsFn(self._clock, self._counter_suffix)))
