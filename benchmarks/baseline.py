"""The baseline graph: the clickstream graph with Beam's built-in DeduplicatePerKey.

Everything but dedup is the job's own graph (pipeline.job.build: the source, ParseEvents,
ComputeMetrics, RetractingChangelog, the sinks), so the two runs differ in one stage
only, bounded (benchmarks.measure) or streaming (`python -m benchmarks.baseline` takes
`clickstream run`'s streaming flags; benchmarks.streaming). DeduplicatePerKey keeps a
BagState and an event-time timer per event_id; its DoFn also declares a processing-time
timer, which sends the whole bounded graph to the BundleBasedDirectRunner
(docs/design.md#processing-time-timers; a streaming job runs there anyway). That is
measured as it is: it is the point of the baseline.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.deduplicate import DeduplicatePerKey
from apache_beam.utils import windowed_value
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import cli, job
from pipeline.options import ClickstreamOptions
from schemas import METRICS_NAMESPACE
from transforms.batching import BundleBatcher, EventBatch, in_global_window
from transforms.events import Event

# DeduplicatePerKey counts nothing: the baseline counts what enters and leaves it. The
# graph's own dedup counts `unique` and `duplicates`; here duplicates are the difference.
DEDUP_INPUT_COUNTER = "dedup_input"
UNIQUE_COUNTER = "unique"


class _CountFn(beam.DoFn):
    """Passes elements through, adding their number to a counter once per bundle."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._counter = Metrics.counter(METRICS_NAMESPACE, name)

    def start_bundle(self) -> None:
        self._seen = 0

    def process(self, element: Event) -> Iterable[Event]:
        self._seen += 1
        yield element

    def finish_bundle(self) -> None:
        if self._seen:
            self._counter.inc(self._seen)
        self._seen = 0


class _CountAndBatchFn(beam.DoFn):
    """Unique events → one EventBatch per bundle (the dedup stage's output type),
    counting them; the per-event hand-over here replaces the graph's own."""

    def __init__(self, name: str) -> None:
        self._counter = Metrics.counter(METRICS_NAMESPACE, name)

    def start_bundle(self) -> None:
        self._batcher: BundleBatcher[None] = BundleBatcher()

    def process(self, event: Event) -> Iterable[WindowedValue]:
        full = self._batcher.add(None, event)
        if full is not None:
            yield self._batch(*full)

    def finish_bundle(self) -> Iterable[WindowedValue]:
        for batch in self._batcher.drain():
            yield self._batch(*batch)

    def _batch(self, _: None, events: list[Event], earliest: Timestamp) -> WindowedValue:
        self._counter.inc(len(events))
        return in_global_window(events, earliest)


class _ExplodeFn(beam.DoFn):
    """EventBatches → Events, each at its own event time (DeduplicatePerKey keys and
    times each event on its own)."""

    def process(self, batch: EventBatch, window=beam.DoFn.WindowParam
                ) -> Iterable[WindowedValue]:
        for event in batch:
            yield windowed_value.create(event, event.event_time_ms * 1000, (window,))


class BeamDeduplicatePerKey(beam.PTransform):
    """EventBatches → the first copy of each event_id (as EventBatches), with Beam's
    DeduplicatePerKey."""

    def __init__(self, allowed_lateness_s: int) -> None:
        super().__init__()
        self._allowed_lateness_s = allowed_lateness_s

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return (
            batches
            | "Explode" >> beam.ParDo(_ExplodeFn()).with_output_types(Event)
            | "CountIn" >> beam.ParDo(_CountFn(DEDUP_INPUT_COUNTER)).with_output_types(Event)
            | "KeyByEventId" >> beam.Map(lambda e: (e.event_id, e)).with_output_types(
                tuple[str, Event])
            | "DeduplicatePerKey" >> DeduplicatePerKey(
                event_time_duration=Duration(seconds=self._allowed_lateness_s))
            | "Values" >> beam.Values().with_output_types(Event)
            | "CountUnique" >> beam.ParDo(_CountAndBatchFn(UNIQUE_COUNTER)
                                          ).with_output_types(EventBatch))


def build_baseline(p: beam.Pipeline, options: ClickstreamOptions) -> None:
    """pipeline.job.build (bounded or streaming, as the flags say) with dedup replaced
    by Beam's DeduplicatePerKey."""
    job.build(p, options,
              dedup=lambda config: BeamDeduplicatePerKey(config.allowed_lateness_s))


def main(argv: Sequence[str] | None = None) -> int:
    """`clickstream run --input_subscription ...` (or `--kafka_bootstrap ...
    --kafka_topic ...`) with the baseline graph: the streaming benchmarks' baseline job
    (benchmarks/streaming.py, benchmarks/streaming_kafka.py), stopped by SIGTERM like it."""
    cli.configure_logging()
    options = PipelineOptions(list(sys.argv[1:] if argv is None else argv))
    if not job.is_streaming(options.view_as(ClickstreamOptions)):
        raise SystemExit("the streaming baseline reads --input_subscription or "
                         "--kafka_topic")
    summary = job.run_streaming(options, graph=build_baseline)
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
