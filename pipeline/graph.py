"""The clickstream graph: the one place where the stages are wired together."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import apache_beam as beam

from transforms.dedup import DEFAULT_BUCKETS, Deduplicated, DeduplicateEvents
from transforms.freshness import MeasureWatermarkLag
from transforms.lateness import CountTooLate
from transforms.metrics import ComputeMetrics, MetricsConfig
from transforms.parse import ParseEvents
from transforms.pseudonymize import PrivacyPolicy
from transforms.retract import HeldRows, RetractingChangelog
from transforms.stable_input import RequireStableInput


class ClickstreamMetrics(beam.PTransform):
    """Raw payloads → (retracting changelog rows, dead-letter rows).

    parse+validate → dedup(event_id) → hour & day windows → metrics → retractions
                                      ├→ raw archive (optional)
                                      ├→ too-late counts (streaming)
                                      └→ watermark lag (streaming)

    `dedup` replaces the dedup stage (Events → unique EventBatches), e.g. to
    benchmark another implementation; by default it is DeduplicateEvents. `archive`
    (e.g. WriteRawArchive) gets the unique events before any windowing, so events too
    late for their windows still land there; `too_late.hour` and `too_late.day` count
    the events the windowing drops. `panes` (e.g. a test's collector) gets the
    windowed MetricPanes with the runner's pane info, before the changelog stage
    re-derives their timing. `held`: what the sinks held at launch (a streaming job
    relaunched without its state continues those windows above their revisions; see
    transforms/retract.py and pipeline/job.py held_at_launch).
    `privacy` (pseudonyms, properties allow-list) applies at parse, before all else.
    """

    def __init__(self, config: MetricsConfig, dedup_buckets: int = DEFAULT_BUCKETS,
                 clock: Callable[[], float] = time.time,
                 dedup: beam.PTransform | None = None,
                 archive: beam.PTransform | None = None,
                 panes: beam.PTransform | None = None,
                 held: HeldRows | None = None,
                 privacy: PrivacyPolicy | None = None,
                 hot_keys: beam.PTransform | None = None,
                 bot_policy: beam.PTransform | None = None) -> None:
        super().__init__()
        self._held = held
        self._privacy = privacy
        self._config = config
        self._dedup_buckets = dedup_buckets
        self._clock = clock
        self._dedup = dedup
        self._archive = archive
        self._panes = panes
        self._hot_keys = hot_keys
        self._bot_policy = bot_policy

    def expand(self, payloads: beam.PCollection
               ) -> tuple[beam.PCollection, beam.PCollection]:
        config = self._config
        events, dead_letters = payloads | "ParseAndValidate" >> ParseEvents(
            self._clock, self._privacy, config.bounded)
        dedup = self._dedup if self._dedup is not None else DeduplicateEvents(
            config.allowed_lateness_s, self._dedup_buckets, config.bounded)
        deduped = events | "Dedup" >> dedup
        # A stand-in dedup (the benchmarks' baseline) gives first copies only, and a
        # bounded run has no horizon to be past.
        unique, past_horizon = (deduped if isinstance(deduped, Deduplicated)
                                else (deduped, None))
        if config.bounded:
            past_horizon = None
        if self._hot_keys is not None:
            unique | "HotKeys" >> self._hot_keys
        if self._bot_policy is not None:
            # Before the archive too: finalize recomputes from the archive, and must
            # agree with the stream on what was set apart.
            unique, suspected = unique | "BotPolicy" >> self._bot_policy
            dead_letters = (dead_letters, suspected) | "AllDeadLetters" >> beam.Flatten()
        archived = unique if past_horizon is None else (
            (unique, past_horizon) | "WithPastHorizon" >> beam.Flatten())
        if self._archive is not None:
            archived | "RawArchive" >> self._archive
        if not config.bounded:
            # Bounded input is never late, nor its watermark behind: it jumps to the end.
            (unique if past_horizon is None else (unique, past_horizon)
             ) | "CountTooLate" >> CountTooLate(config.allowed_lateness_s)
            unique | "WatermarkLag" >> MeasureWatermarkLag()
        panes = unique | "Metrics" >> ComputeMetrics(config, ("hour", "day"))
        if self._panes is not None:
            panes | "Panes" >> self._panes
        changelog = panes | "Retract" >> RetractingChangelog(
            config.allowed_lateness_s, bounded=config.bounded, held=self._held)
        return changelog, dead_letters


def write_to_sinks(outputs: tuple[beam.PCollection, beam.PCollection],
                   sinks: Mapping[str, beam.PTransform], stable_input: bool = False) -> None:
    """(changelog rows, dead-letter rows) into every sink, each under its own label;
    with ``stable_input``, only rows a completed checkpoint holds
    (transforms/stable_input.py)."""
    if stable_input:
        changelog, dead_letters = outputs
        outputs = (changelog | "StableChangelog" >> RequireStableInput(),
                   dead_letters | "StableDeadLetters" >> RequireStableInput())
    for label, sink in sinks.items():
        outputs | label >> sink
