"""Helpers to drive ClickstreamMetrics with TestStream on the DirectRunner."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream

from pipeline.graph import ClickstreamMetrics
from pipeline.job import counters_of
from transforms.metrics import MetricsConfig

DAY = datetime(2026, 11, 1, tzinfo=UTC)
_COLLECTED: dict[str, list[Any]] = {}


def at(hour: int, minute: int = 0, day_offset: int = 0) -> float:
    """Epoch seconds of DAY + day_offset at hour:minute UTC."""
    return DAY.timestamp() + day_offset * 86400 + hour * 3600 + minute * 60


def payload(event_id: str, t_s: float, event_type: str = "page_view",
            user: str | None = "u1", **extra: Any) -> bytes:
    record = {"event_id": event_id, "event_type": event_type,
              "event_time": int(t_s * 1000), "device_id": "d-" + (user or "anon"),
              "user_id": user, **extra}
    return json.dumps(record).encode()


class Collect(beam.DoFn):
    """Hands every element back to the test. The DirectRunner runs in this process, and
    so does Prism's LOOPBACK worker (in the process that submitted the job);
    assert_that is not used because its streaming GroupByKey missed the rows that
    event-time timers emit at the end of the stream."""

    def __init__(self, name: str) -> None:
        self._name = name

    def process(self, row: Any) -> None:
        _COLLECTED.setdefault(self._name, []).append(row)


def streaming_options(runner_args: Sequence[str] | None = None) -> PipelineOptions:
    """Streaming options for `runner_args` (default: the BundleBasedDirectRunner, which
    runs TestStream in this process; tests/prism_streams.py passes Prism's preset)."""
    options = PipelineOptions(list(runner_args or ["--runner=BundleBasedDirectRunner"]))
    options.view_as(StandardOptions).streaming = True
    return options


def run_stream(stream: TestStream, config: MetricsConfig | None = None,
               runner_args: Sequence[str] | None = None
               ) -> tuple[list[dict], list[dict]]:
    """Runs the stream through the graph; returns (changelog rows, dead letters)."""
    run = record_stream(stream, config, runner_args, panes=False)
    return run["changelog"], run["dead"]


class PaneSeen(beam.DoFn):
    """A MetricPane with the pane index and timing the runner gave it, in arrival order
    (read from the pane itself: ComputeMetrics releases the windows afterwards, and with
    them the runner's pane info)."""

    def process(self, pane: Any) -> Iterable[dict]:
        yield {"metric": pane.metric, "dims": pane.dims, "granularity": pane.granularity,
               "window_start": pane.window_start, "value": pane.value,
               "index": pane.pane_index, "timing": pane.runner_timing,
               "seen_at": time.monotonic()}


def record_stream(stream: TestStream, config: MetricsConfig | None = None,
                  runner_args: Sequence[str] | None = None, panes: bool = True
                  ) -> dict[str, Any]:
    """Runs the stream through the graph; returns its changelog rows, dead letters,
    the runner's panes before the changelog stage (if `panes`, sorted by arrival) and
    the job's clickstream counters."""
    config = config or MetricsConfig()
    tap = beam.ParDo(PaneSeen()) | beam.ParDo(Collect("panes")) if panes else None
    with beam.Pipeline(options=streaming_options(runner_args)) as p:
        changelog, dead = p | stream | ClickstreamMetrics(replace(config, bounded=False),
                                                          panes=tap)
        changelog | "CollectChangelog" >> beam.ParDo(Collect("changelog"))
        dead | "CollectDead" >> beam.ParDo(Collect("dead"))
    return {"changelog": _COLLECTED.pop("changelog", []), "dead": _COLLECTED.pop("dead", []),
            "panes": sorted(_COLLECTED.pop("panes", []), key=lambda r: r["seen_at"]),
            "counters": counters_of(p.result)}


def rows_for(changelog: list[dict], metric: str, granularity: str, window_start: float,
             dims: str | None = None) -> list[dict]:
    start = datetime.fromtimestamp(window_start, tz=UTC)
    rows = [r for r in changelog if r["metric"] == metric and r["granularity"] == granularity
            and r["window_start"] == start and (dims is None or r["dims"] == dims)]
    return sorted(rows, key=lambda r: (r["revision"], r["sign"]))
