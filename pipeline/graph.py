"""The clickstream graph: the one place where the stages are wired together."""

from __future__ import annotations

import time
from typing import Callable

import apache_beam as beam

from transforms.dedup import DeduplicateEvents
from transforms.metrics import ComputeMetrics, MetricsConfig
from transforms.parse import ParseEvents
from transforms.retract import RetractingChangelog


class ClickstreamMetrics(beam.PTransform):
    """Raw payloads → (retracting changelog rows, dead-letter rows).

    parse+validate → dedup(event_id) → hour & day windows → metrics → retractions
    """

    def __init__(self, config: MetricsConfig, dedup_buckets: int = 256,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._config = config
        self._dedup_buckets = dedup_buckets
        self._clock = clock

    def expand(self, payloads: beam.PCollection
               ) -> tuple[beam.PCollection, beam.PCollection]:
        config = self._config
        events, dead_letters = payloads | "ParseAndValidate" >> ParseEvents(self._clock)
        unique = events | "Dedup" >> DeduplicateEvents(
            config.allowed_lateness_s, self._dedup_buckets, config.bounded)
        panes = (
            unique | "HourlyMetrics" >> ComputeMetrics("hour", config),
            unique | "DailyMetrics" >> ComputeMetrics("day", config),
        ) | "AllPanes" >> beam.Flatten()
        changelog = panes | "Retract" >> RetractingChangelog(config.allowed_lateness_s)
        return changelog, dead_letters
