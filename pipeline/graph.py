"""The clickstream graph: the one place where the stages are wired together."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import apache_beam as beam

from transforms.dedup import DEFAULT_BUCKETS, DeduplicateEvents
from transforms.lateness import CountTooLate
from transforms.metrics import ComputeMetrics, MetricsConfig
from transforms.parse import ParseEvents
from transforms.retract import RetractingChangelog


class ClickstreamMetrics(beam.PTransform):
    """Raw payloads → (retracting changelog rows, dead-letter rows).

    parse+validate → dedup(event_id) → hour & day windows → metrics → retractions
                                      ├→ raw archive (optional)
                                      └→ too-late counts

    `dedup` replaces the dedup stage (Events → unique Events, timestamps kept), e.g. to
    benchmark another implementation; by default it is DeduplicateEvents. `archive`
    (e.g. WriteRawArchive) gets the unique events before any windowing, so events too
    late for their windows still land there; `too_late.hour` and `too_late.day` count
    the events the windowing drops.
    """

    def __init__(self, config: MetricsConfig, dedup_buckets: int = DEFAULT_BUCKETS,
                 clock: Callable[[], float] = time.time,
                 dedup: beam.PTransform | None = None,
                 archive: beam.PTransform | None = None) -> None:
        super().__init__()
        self._config = config
        self._dedup_buckets = dedup_buckets
        self._clock = clock
        self._dedup = dedup
        self._archive = archive

    def expand(self, payloads: beam.PCollection
               ) -> tuple[beam.PCollection, beam.PCollection]:
        config = self._config
        events, dead_letters = payloads | "ParseAndValidate" >> ParseEvents(self._clock)
        dedup = self._dedup if self._dedup is not None else DeduplicateEvents(
            config.allowed_lateness_s, self._dedup_buckets, config.bounded)
        unique = events | "Dedup" >> dedup
        if self._archive is not None:
            unique | "RawArchive" >> self._archive
        if not config.bounded:
            # Bounded input is never late (its watermark jumps to the end at once).
            unique | "CountTooLate" >> CountTooLate(config.allowed_lateness_s)
        panes = unique | "Metrics" >> HourAndDayMetrics(config)
        changelog = panes | "Retract" >> RetractingChangelog(config.allowed_lateness_s)
        return changelog, dead_letters


class HourAndDayMetrics(beam.PTransform):
    """Unique events → MetricPanes of every metric for hour and day windows.

    Its own transform because the daily finalize job (pipeline/finalize.py) recomputes
    a day from the archive with exactly these metrics: one definition for both paths.
    """

    def __init__(self, config: MetricsConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, unique: beam.PCollection) -> beam.PCollection:
        return (
            unique | "HourlyMetrics" >> ComputeMetrics("hour", self._config),
            unique | "DailyMetrics" >> ComputeMetrics("day", self._config),
        ) | "AllPanes" >> beam.Flatten()


def write_to_sinks(outputs: tuple[beam.PCollection, beam.PCollection],
                   sinks: Mapping[str, beam.PTransform]) -> None:
    """(changelog rows, dead-letter rows) into every sink, each under its own label."""
    for label, sink in sinks.items():
        outputs | label >> sink
