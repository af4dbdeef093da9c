"""Watermark lag from inside the graph (TestStream, BundleBasedDirectRunner): a sample
when the watermark passes the newest event time seen, lag = clock - that time; late
data does not fake a lag; an idle stream stops sampling."""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from tests.streaming import _COLLECTED, Collect, at, streaming_options
from transforms.batching import EventBatch
from transforms.events import Event
from transforms.freshness import MeasureWatermarkLag

CLOCK_S = at(12)  # the wall clock the probe reads: noon


def batch(*minutes_after_ten: int) -> TimestampedValue:
    events = [Event(f"e{m}", "tap", int(at(10, m) * 1000), "d", None, None, None, {})
              for m in minutes_after_ten]
    return TimestampedValue(events, min(e.event_time_ms for e in events) / 1000)


def samples(stream: TestStream, runner_args: Sequence[str] | None = None
            ) -> list[tuple[float, float]]:
    with beam.Pipeline(options=streaming_options(runner_args)) as p:
        (p | stream | MeasureWatermarkLag(period_s=600, clock=lambda: CLOCK_S)
         | beam.ParDo(Collect("lag")))
    return sorted((s.watermark_s, s.lag_s) for s in _COLLECTED.pop("lag", []))


def lag_stream() -> TestStream:
    return (TestStream()
            .add_elements([batch(1, 7)])               # newest 10:07 → tick 10:10
            .advance_watermark_to(at(10, 11))          # sample: 12:00 - 10:10
            .add_elements([batch(3)])                  # late: behind the watermark
            .add_elements([batch(25)])                 # newest 10:25 → tick 10:30
            .advance_watermark_to(at(10, 31))          # sample: 12:00 - 10:30
            .advance_watermark_to_infinity())          # no data since: no sample


LAG_SAMPLES = [(at(10, 10), CLOCK_S - at(10, 10)), (at(10, 30), CLOCK_S - at(10, 30))]


def steady_stream() -> TestStream:
    """Newer data always arrives before the watermark reaches the armed tick, as in any
    steady stream whose watermark trails its newest events."""
    return (TestStream()
            .add_elements([batch(1, 7)])               # newest 10:07 → tick 10:10
            .add_elements([batch(15)])                 # newer, the tick stays at 10:10
            .advance_watermark_to(at(10, 11))          # sample 10:10, re-arm at 10:20
            .add_elements([batch(25)])                 # newer, the tick stays at 10:20
            .advance_watermark_to(at(10, 21))          # sample 10:20, re-arm at 10:30
            .advance_watermark_to(at(10, 31))          # sample 10:30, nothing newer
            .advance_watermark_to_infinity())          # no data since: no sample


STEADY_SAMPLES = [(at(10, m), CLOCK_S - at(10, m)) for m in (10, 20, 30)]


def test_lag_is_the_clock_minus_the_watermark_at_the_newest_event_time() -> None:
    assert samples(lag_stream()) == LAG_SAMPLES


def test_a_steady_stream_is_sampled_each_time_the_watermark_crosses_a_period() -> None:
    assert samples(steady_stream()) == STEADY_SAMPLES


def test_the_job_reads_the_latest_lag_from_the_metrics() -> None:
    """Through the job's metrics on the FnApiRunner (the BundleBasedDirectRunner drops
    metrics set in timers under TestStream): a bounded input's timer fires at the end."""
    from pipeline.job import watermark_lag_s

    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = (p | beam.Create([batch(25).value]).with_output_types(EventBatch)
         | beam.Map(lambda b: TimestampedValue(b, b[0].event_time_ms / 1000))
         | MeasureWatermarkLag(period_s=600, clock=lambda: CLOCK_S))
    result = p.run()
    result.wait_until_finish()
    assert watermark_lag_s(result) == int(CLOCK_S - at(10, 30))
