"""The metrics of the output contract, per window, as accumulating panes.

Each metric is a keyed combine over windowed events, so the runner can lift it into
per-bundle partial aggregates before the shuffle. The output is one `MetricPane` per
(metric, dims, window, pane), carrying the window bounds and the runner's pane info,
because those are lost when the changelog stage re-windows into the global window.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import NamedTuple

import apache_beam as beam
from apache_beam.transforms.combiners import CountCombineFn

import schemas
from transforms.distinct import DEFAULT_LG_K, distinct_count_fn
from transforms.events import Event
from transforms.funnel import FunnelFn, funnel_dims
from transforms.windowing import WindowByGranularity

DEFAULT_FUNNEL = ("page_view", "add_to_cart", "checkout", "purchase")
FEATURE_EVENT_TYPE = "feature_use"
FEATURE_PROPERTY = "feature"

MetricKey = tuple[str, str]  # metric, canonical dims


class MetricPane(NamedTuple):
    metric: str
    dims: str
    granularity: str
    window_start: datetime
    window_end: datetime
    value: int
    pane_index: int
    runner_timing: str  # the runner's label; the changelog stage re-derives timing


@dataclass(frozen=True)
class MetricsConfig:
    early_firing_s: int = 60
    late_firing_s: int = 60
    allowed_lateness_s: int = 3 * 86400
    distinct: str = "exact"
    hll_lg_k: int = DEFAULT_LG_K
    funnel_steps: tuple[str, ...] = DEFAULT_FUNNEL
    bounded: bool = False

    def for_bounded_input(self) -> MetricsConfig:
        """A bounded run's watermark jumps to the end at once: there are no early or
        late panes to show, and the batch runner has no clock for processing-time
        triggers. The default trigger also keeps combiner lifting on."""
        return replace(self, bounded=True)


def _utc(ts) -> datetime:
    return datetime.fromtimestamp(ts.micros / 1e6, tz=UTC)


class ToMetricPaneFn(beam.DoFn):
    """((metric, dims), value) in a window and pane → a self-describing MetricPane."""

    def __init__(self, granularity: str) -> None:
        self._granularity = granularity

    def process(self, keyed: tuple[MetricKey, int], window=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam) -> Iterable[MetricPane]:
        (metric, dims), value = keyed
        yield MetricPane(metric, dims, self._granularity, _utc(window.start),
                         _utc(window.end), int(value), pane.index,
                         _TIMING_NAMES.get(pane.timing, "UNKNOWN"))


_TIMING_NAMES = {0: "EARLY", 1: "ON_TIME", 2: "LATE", 3: "UNKNOWN"}


def _funnel_hit(event: Event, step_of: dict[str, int]) -> tuple[str, tuple[str, int, int]]:
    return "funnel", (event.identity, event.event_time_ms, step_of[event.event_type])


def _feature_user(event: Event) -> tuple[MetricKey, str]:
    feature = event.properties[FEATURE_PROPERTY]
    return ("feature_users", schemas.canonical_dims({"feature": feature})), event.identity


def _is_feature_use(event: Event) -> bool:
    return event.event_type == FEATURE_EVENT_TYPE and FEATURE_PROPERTY in event.properties


@functools.lru_cache(maxsize=4096)
def _event_type_dims(event_type: str) -> str:
    return schemas.canonical_dims({"event_type": event_type})


class FunnelCounts(beam.PTransform):
    """Windowed events → ((funnel_step, {step, name}), identities that reached it)."""

    def __init__(self, steps: Sequence[str]) -> None:
        super().__init__()
        self._steps = tuple(steps)

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        step_of = {name: i for i, name in enumerate(self._steps)}
        keys = [("funnel_step", schemas.canonical_dims(d)) for d in funnel_dims(self._steps)]

        def per_step(counts: list[int]) -> list[tuple[MetricKey, int]]:
            return list(zip(keys, counts, strict=False))

        return (
            events
            | "FunnelEvents" >> beam.Filter(lambda e: e.event_type in step_of)
            | "ToHits" >> beam.Map(_funnel_hit, step_of)
            | "ReachedPerWindow" >> beam.CombinePerKey(FunnelFn(len(self._steps)))
            | "PerStep" >> beam.FlatMap(lambda kv: per_step(kv[1])))


class ComputeMetrics(beam.PTransform):
    """Unique events → MetricPanes of every metric at one granularity (hour or day)."""

    def __init__(self, granularity: str, config: MetricsConfig) -> None:
        super().__init__()
        self._granularity = granularity
        self._config = config

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        config = self._config
        windowed = events | "Window" >> WindowByGranularity(
            self._granularity, config.early_firing_s, config.late_firing_s,
            config.allowed_lateness_s, config.bounded)
        no_dims = schemas.canonical_dims({})
        metrics = [
            windowed
            | "KeyByEventType" >> beam.Map(
                lambda e: (("events", _event_type_dims(e.event_type)), None))
            | "CountEvents" >> beam.CombinePerKey(CountCombineFn()),
            windowed
            | "KeyIdentity" >> beam.Map(lambda e: (("active_users", no_dims), e.identity))
            | "CountActiveUsers" >> beam.CombinePerKey(
                distinct_count_fn(config.distinct, config.hll_lg_k)),
        ]
        if self._granularity == "day":
            metrics.append(
                windowed
                | "FeatureUses" >> beam.Filter(_is_feature_use)
                | "KeyFeatureUser" >> beam.Map(_feature_user)
                | "CountFeatureUsers" >> beam.CombinePerKey(
                    distinct_count_fn(config.distinct, config.hll_lg_k)))
            metrics.append(windowed | "Funnel" >> FunnelCounts(config.funnel_steps))
        return (
            metrics
            | "AllMetrics" >> beam.Flatten()
            | "ToMetricPane" >> beam.ParDo(ToMetricPaneFn(self._granularity)))
