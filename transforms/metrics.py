"""The metrics of the output contract, per window, as accumulating panes.

Each metric is a keyed combine over windowed events, so the runner can lift it into
per-bundle partial aggregates before the shuffle. The output is one `MetricPane` per
(metric, dims, window, pane), carrying the window bounds and the runner's pane info,
because those are lost when the changelog stage re-windows into the global window.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import schemas
from schemas import GRANULARITY_SECONDS
from transforms.batching import EventBatch
from transforms.distinct import DEFAULT_LG_K, SketchedCount, distinct_count_fn
from transforms.events import Event
from transforms.funnel import FunnelFn, funnel_dims
from transforms.windowing import WindowByGranularity

DEFAULT_FUNNEL = ("page_view", "add_to_cart", "checkout", "purchase")
FEATURE_EVENT_TYPE = "feature_use"
FEATURE_PROPERTY = "feature"

MetricKey = tuple[str, str]  # metric, canonical dims
WindowedMetricKey = tuple[str, str, int]  # metric, canonical dims, window start (epoch ms)


class MetricPane(NamedTuple):
    metric: str
    dims: str
    granularity: str
    window_start: datetime
    window_end: datetime
    value: int
    pane_index: int
    runner_timing: str  # the runner's label; the changelog stage re-derives timing
    sketch: bytes | None = None  # --distinct hll: the window's serialized HLL sketch


@dataclass(frozen=True)
class MetricsConfig:
    early_firing_s: int = 60
    late_firing_s: int = 60
    allowed_lateness_s: int = 3 * 86400
    distinct: str = "exact"
    hll_lg_k: int = DEFAULT_LG_K
    funnel_steps: tuple[str, ...] = DEFAULT_FUNNEL
    bounded: bool = False
    # Event fields that split the `events` metric besides event_type (see
    # events_dimension_values); () keeps its dims {"event_type": ...}.
    events_dimensions: tuple[str, ...] = ()

    def for_bounded_input(self) -> MetricsConfig:
        """A bounded run's watermark jumps to the end at once: there are no early or
        late panes to show, and the batch runner has no clock for processing-time
        triggers. The default trigger also keeps combiner lifting on."""
        return replace(self, bounded=True)


def _utc_ms(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)


class ToMetricPaneFn(beam.DoFn):
    """((metric, dims, window start ms), value) in a pane → a self-describing MetricPane.

    A bounded run's values are complete at once: its only pane is on time."""

    def __init__(self, granularity: str, bounded: bool) -> None:
        self._granularity = granularity
        self._size_ms = GRANULARITY_SECONDS[granularity] * 1000
        self._bounded = bounded

    def process(self, keyed: tuple[WindowedMetricKey, int | SketchedCount],
                pane=beam.DoFn.PaneInfoParam) -> Iterable[MetricPane]:
        (metric, dims, start_ms), value = keyed
        index, timing = (0, "ON_TIME") if self._bounded else (
            pane.index, _TIMING_NAMES.get(pane.timing, "UNKNOWN"))
        sketch = None
        if isinstance(value, SketchedCount):
            value, sketch = value
        yield MetricPane(metric, dims, self._granularity, _utc_ms(start_ms),
                         _utc_ms(start_ms + self._size_ms), int(value), index, timing,
                         sketch)


_TIMING_NAMES = {0: "EARLY", 1: "ON_TIME", 2: "LATE", 3: "UNKNOWN"}


@functools.lru_cache(maxsize=4096)
def _event_type_dims(event_type: str) -> str:
    return schemas.canonical_dims({"event_type": event_type})


@functools.lru_cache(maxsize=4096)
def _feature_dims(feature: str) -> str:
    return schemas.canonical_dims({"feature": feature})


NO_DIMS = schemas.canonical_dims({})
# Fields that identify a person or a single event: never a dimension (unbounded
# cardinality, and a metric row would carry the identifier).
NOT_DIMENSIONS = frozenset(("event_id", "event_time", "device_id", "user_id", "session_id",
                            "properties", "event_type"))
MISSING_DIMENSION = ""  # the value of a dimension an event does not carry


def events_dimension_values(names: Sequence[str]) -> Callable[[Event], tuple[str, ...]]:
    """An event's values of the configured `events` dimensions: any field of
    schemas/event.avsc but the identifying ones, so a field a new schema version adds
    becomes a dimension by configuration alone (it arrives in Event.attributes)."""
    fields = {spec["name"] for spec in schemas.event_schema()["fields"]}
    for name in names:
        if name in NOT_DIMENSIONS or name not in fields:
            raise ValueError(
                f"events dimension {name!r}: not a field of schemas/event.avsc, or an "
                f"identifying one ({', '.join(sorted(NOT_DIMENSIONS))})")
    getters = tuple(
        (lambda e, name=name: getattr(e, name) or MISSING_DIMENSION) if name in Event._fields
        else (lambda e, name=name: e.attributes.get(name, MISSING_DIMENSION))
        for name in names)
    return lambda e: tuple(get(e) for get in getters)


@functools.lru_cache(maxsize=65536)
def _events_dims(event_type: str, names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return schemas.canonical_dims({"event_type": event_type, **dict(zip(names, values,
                                                                        strict=True))})


class MetricSpec:
    """One metric: what an event contributes to it, and how contributions combine."""

    def __init__(self, name: str, combine_fn: beam.CombineFn,
                 contributions: Callable[[Event], Iterable[tuple[str, Any]]]) -> None:
        self.name = name
        self.combine_fn = combine_fn
        self.contributions = contributions


def metric_specs(granularity: str, config: MetricsConfig) -> list[MetricSpec]:
    def event_count(e: Event) -> Iterable[tuple[str, Any]]:
        return ((_event_type_dims(e.event_type), None),)

    if config.events_dimensions:
        names, values_of = config.events_dimensions, events_dimension_values(
            config.events_dimensions)

        def event_count(e: Event) -> Iterable[tuple[str, Any]]:
            return ((_events_dims(e.event_type, names, values_of(e)), None),)

    def identity(e: Event) -> Iterable[tuple[str, Any]]:
        return ((NO_DIMS, e.identity),)

    specs = [
        MetricSpec("events", CountCombineFn(), event_count),
        MetricSpec("active_users", distinct_count_fn(config.distinct, config.hll_lg_k),
                   identity),
    ]
    if granularity == "day":
        step_of = {name: i for i, name in enumerate(config.funnel_steps)}

        def feature_user(e: Event) -> Iterable[tuple[str, Any]]:
            if e.event_type == FEATURE_EVENT_TYPE and FEATURE_PROPERTY in e.properties:
                return ((_feature_dims(e.properties[FEATURE_PROPERTY]), e.identity),)
            return ()

        def funnel_hit(e: Event) -> Iterable[tuple[str, Any]]:
            step = step_of.get(e.event_type)
            if step is None:
                return ()
            return ((NO_DIMS, (e.identity, e.event_time_ms, step)),)

        specs.append(MetricSpec(
            "feature_users", distinct_count_fn(config.distinct, config.hll_lg_k),
            feature_user))
        specs.append(MetricSpec(FUNNEL, FunnelFn(len(config.funnel_steps)), funnel_hit))
    return specs


FUNNEL = "funnel"  # internal: one accumulator per day, expanded to funnel_step rows


class PreAggregateFn(beam.DoFn):
    """Per bundle, folds events into one partial accumulator per (metric, dims, window),
    for every granularity at once; each granularity's partials leave on its own output.

    Combiner lifting, done before window assignment: a bundle then sends one element per
    metric key and window downstream instead of one per event and metric, which is
    where the DirectRunner spent most of its time (window assignment, keying and the
    combine's per-element path). One pass serves the hour and the day: a second
    consumer of the unique events cost the runner's per-element hand-over again.
    Each partial carries the earliest event time it holds, so it lands in the same
    window, and is as late or on time, as its events.
    """

    def __init__(self, granularities: Sequence[str], config: MetricsConfig) -> None:
        # Per metric: what an event contributes (the same at every granularity, so it is
        # asked once an event) and, per granularity, the window size and combine.
        plans: dict[str, tuple[Callable, list[tuple[str, int, beam.CombineFn]]]] = {}
        for granularity in granularities:
            for spec in metric_specs(granularity, config):
                _, targets = plans.setdefault(spec.name, (spec.contributions, []))
                targets.append((granularity, GRANULARITY_SECONDS[granularity] * 1000,
                                spec.combine_fn))
        self._plans = tuple((name, contributions, tuple(targets))
                            for name, (contributions, targets) in plans.items())

    def start_bundle(self) -> None:
        # (granularity, metric, dims, window start ms) → [accumulator, earliest ms]
        self._partials: dict[tuple[str, str, str, int], list] = {}

    def process(self, unique: EventBatch) -> None:
        partials = self._partials
        for event in unique:
            t = event.event_time_ms
            for name, contributions, targets in self._plans:
                contributed = contributions(event)
                if not contributed:
                    continue
                for granularity, size_ms, combine_fn in targets:
                    window = t - t % size_ms
                    for dims, value in contributed:
                        key = (granularity, name, dims, window)
                        partial = partials.get(key)
                        if partial is None:
                            partial = partials[key] = [combine_fn.create_accumulator(), t]
                        elif t < partial[1]:
                            partial[1] = t
                        partial[0] = combine_fn.add_input(partial[0], value)

    def finish_bundle(self) -> Iterable[beam.pvalue.TaggedOutput]:
        for (granularity, metric, dims, window), (acc, earliest_ms) in \
                self._partials.items():
            yield beam.pvalue.TaggedOutput(granularity, WindowedValue(
                ((metric, dims, window), acc), Timestamp(micros=earliest_ms * 1000),
                (GlobalWindow(),)))
        self._partials = {}


class MergePartialsFn(beam.CombineFn):
    """Combines partial accumulators of `combine_fn` (from PreAggregateFn), counting
    them: a pane that holds no partial has no value (None), not the value of an empty
    accumulator. Flink's runner fires such an empty pane at each window's lateness
    horizon (docs/flink.md#found-on-flink-beam-270-java-runner-flink-119); read as 0, it
    overwrote every window's value."""

    def __init__(self, combine_fn: beam.CombineFn) -> None:
        self._fn = combine_fn

    def create_accumulator(self) -> tuple[int, Any]:
        return 0, self._fn.create_accumulator()

    def add_input(self, acc: tuple[int, Any], partial: Any) -> tuple[int, Any]:
        merged, inner = acc
        return merged + 1, self._fn.merge_accumulators([inner, partial])

    def merge_accumulators(self, accs: Iterable[tuple[int, Any]]) -> tuple[int, Any]:
        accs = list(accs)
        return (sum(merged for merged, _ in accs),
                self._fn.merge_accumulators([inner for _, inner in accs]))

    def extract_output(self, acc: tuple[int, Any]) -> Any:
        merged, inner = acc
        return self._fn.extract_output(inner) if merged else None


_STEP_NAMES = {"hour": "Hourly", "day": "Daily"}


class ComputeMetrics(beam.PTransform):
    """Unique events (EventBatches) → MetricPanes of every metric, hourly and daily."""

    def __init__(self, config: MetricsConfig,
                 granularities: Sequence[str] = ("hour", "day")) -> None:
        super().__init__()
        self._config = config
        self._granularities = tuple(granularities)

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        partials = events | "PreAggregate" >> beam.ParDo(
            PreAggregateFn(self._granularities, self._config)).with_outputs(
                *self._granularities)
        return (
            [partials[granularity] | _STEP_NAMES[granularity] >> CombinePartials(
                granularity, self._config) for granularity in self._granularities]
            | "AllGranularities" >> beam.Flatten())


class CombinePartials(beam.PTransform):
    """Partials of one granularity → windowed, triggered MetricPanes of every metric."""

    def __init__(self, granularity: str, config: MetricsConfig) -> None:
        super().__init__()
        self._granularity = granularity
        self._config = config

    def expand(self, partials: beam.PCollection) -> beam.PCollection:
        config = self._config
        if config.bounded:
            # Every key carries its window, and bounded input is complete: combining in
            # the global window gives the same values without the runner's per-window
            # trigger machinery (measured: ~1.4 ms a key, ~6% of a 1M-event run).
            windowed = partials
        else:
            windowed = partials | "Window" >> WindowByGranularity(
                self._granularity, config.early_firing_s, config.late_firing_s,
                config.allowed_lateness_s)
        funnel_dims_json = [schemas.canonical_dims(d) for d in funnel_dims(config.funnel_steps)]
        outputs = []
        for spec in metric_specs(self._granularity, config):
            name = spec.name
            values = (
                windowed
                | f"Only_{name}" >> beam.Filter(lambda kv, name=name: kv[0][0] == name)
                | f"Combine_{name}" >> beam.CombinePerKey(MergePartialsFn(spec.combine_fn))
                | f"NonEmpty_{name}" >> beam.Filter(lambda kv: kv[1] is not None))
            if name == FUNNEL:
                values = values | "PerFunnelStep" >> beam.FlatMap(
                    lambda kv: [(("funnel_step", dims, kv[0][2]), reached) for dims, reached
                                in zip(funnel_dims_json, kv[1], strict=True)])
            outputs.append(values)
        panes = (
            outputs
            | "AllMetrics" >> beam.Flatten()
            | "ToMetricPane" >> beam.ParDo(ToMetricPaneFn(self._granularity, config.bounded)))
        if config.bounded:
            return panes
        # A MetricPane names its window itself; out of the hour's or the day's windowing,
        # the two granularities flatten into one PCollection of one windowing.
        return panes | "ReleaseWindows" >> beam.WindowInto(GlobalWindows())
