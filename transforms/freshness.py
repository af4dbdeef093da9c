"""Watermark lag, measured inside the graph so that every runner reports it.

The lag is wall-clock time minus the event-time watermark: how far behind real time the
on-time panes are. Python DoFns cannot read the watermark, but an event-time timer fires
when the watermark passes its time, so a timer set at the newest event time seen tells,
when it fires, that the watermark has just reached that time: lag = now - timer time.
The samples go to a Beam gauge (`watermark_lag_s`, the latest) and a distribution
(`watermark_lag_ms`), which DirectRunner, Prism and Flink return through the job's
metrics, Dataflow shows as custom job metrics, and the streaming job prints with its
progress; each sample is also emitted as a `WatermarkLag` element and logged (a line per
sample, at most one per period of event time): the DirectRunner's streaming runner drops
the metrics of timer-fired bundles, where the samples are taken, so there the log line is
the only trace the job's output carries (benchmarks/streaming.py reads it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, Tuple  # noqa: UP035 - Beam infers coders from typing.Tuple

import apache_beam as beam
from apache_beam.coders import BooleanCoder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

from schemas import METRICS_NAMESPACE
from transforms.batching import EventBatch

log = logging.getLogger("clickstream")
DEFAULT_PERIOD_S = 60


class WatermarkLag(NamedTuple):
    watermark_s: float  # the event time the watermark had just passed
    measured_at_s: float  # wall clock
    lag_s: float


class ProbeWatermarkFn(beam.DoFn):
    """One key: arms an event-time timer at the newest event time seen (rounded up to
    the period), and when it fires reports now - that time.

    The newest time, never an older one: a late element's time is behind the
    watermark, and a timer there would fire at once and report the element's lateness
    instead. One timer at a time, left where it is while newer data arrives (a timer
    moved forward with every newer element never fires under a steady stream, whose
    newest data is always ahead of the watermark); when it fires it re-arms at the
    newest time seen since, so a steady stream is sampled each time the watermark
    crosses a period, and an idle or finished stream (watermark at infinity) stops
    sampling instead of spinning.
    """

    # (armed, the armed or last fired tick, the newest event time seen), all ms
    PROBE = ReadModifyWriteStateSpec(
        "probe", TupleCoder((BooleanCoder(), VarIntCoder(), VarIntCoder())))
    TICK = TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, period_s: int, clock: Callable[[], float]) -> None:
        self._period_ms = period_s * 1000
        self._clock = clock
        self._gauge = Metrics.gauge(METRICS_NAMESPACE, "watermark_lag_s")
        self._distribution = Metrics.distribution(METRICS_NAMESPACE, "watermark_lag_ms")

    def _tick_at(self, event_ms: int) -> int:
        return -(-event_ms // self._period_ms) * self._period_ms  # rounded up

    def process(self, keyed: tuple[str, int],
                probe=beam.DoFn.StateParam(PROBE),
                tick=beam.DoFn.TimerParam(TICK)) -> None:
        _, newest_ms = keyed
        armed, tick_ms, seen_ms = probe.read() or (False, 0, 0)
        seen_ms = max(seen_ms, newest_ms)
        if not armed and self._tick_at(seen_ms) > tick_ms:  # data no sample covered yet
            tick_ms, armed = self._tick_at(seen_ms), True
            tick.set(Timestamp(micros=tick_ms * 1000))
        probe.write((armed, tick_ms, seen_ms))

    @on_timer(TICK)
    def sample(self, fired_at=beam.DoFn.TimestampParam,
               probe=beam.DoFn.StateParam(PROBE),
               tick=beam.DoFn.TimerParam(TICK)) -> Iterable[WatermarkLag]:
        _, tick_ms, seen_ms = probe.read() or (False, 0, 0)
        armed = self._tick_at(seen_ms) > tick_ms  # newer data came meanwhile: next tick
        if armed:
            tick_ms = self._tick_at(seen_ms)
            tick.set(Timestamp(micros=tick_ms * 1000))
        probe.write((armed, tick_ms, seen_ms))
        now_s = self._clock()
        watermark_s = fired_at.micros / 1e6
        lag_s = max(0.0, now_s - watermark_s)
        self._gauge.set(int(lag_s))
        self._distribution.update(int(lag_s * 1000))
        log.info("watermark lag sample: %.1f s (the watermark passed %s)", lag_s,
                 fired_at.to_rfc3339())
        yield WatermarkLag(watermark_s, now_s, lag_s)


class MeasureWatermarkLag(beam.PTransform):
    """Unique EventBatches → WatermarkLag samples (and the watermark_lag_* metrics)."""

    def __init__(self, period_s: int = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._period_s = period_s
        self._clock = clock

    def expand(self, unique: beam.PCollection) -> beam.PCollection:
        return (
            unique
            # One key: a handful of elements per bundle (one per batch), all on one worker.
            | "NewestEventTime" >> beam.Map(
                lambda batch: ("watermark", max(e.event_time_ms for e in batch))
            ).with_input_types(EventBatch).with_output_types(Tuple[str, int])  # noqa: UP006
            | "Probe" >> beam.ParDo(ProbeWatermarkFn(self._period_s, self._clock)))
