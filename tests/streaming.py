"""Helpers to drive ClickstreamMetrics with TestStream on the DirectRunner."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream

from pipeline.graph import ClickstreamMetrics
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
    """Hands every element back to the test. The DirectRunner runs in this process;
    assert_that is not used because its streaming GroupByKey missed the rows that
    event-time timers emit at the end of the stream."""

    def __init__(self, name: str) -> None:
        self._name = name

    def process(self, row: Any) -> None:
        _COLLECTED.setdefault(self._name, []).append(row)


def run_stream(stream: TestStream, config: MetricsConfig | None = None
               ) -> tuple[list[dict], list[dict]]:
    """Runs the stream through the graph; returns (changelog rows, dead letters)."""
    config = config or MetricsConfig()
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as p:
        changelog, dead = p | stream | ClickstreamMetrics(replace(config, bounded=False))
        changelog | "CollectChangelog" >> beam.ParDo(Collect("changelog"))
        dead | "CollectDead" >> beam.ParDo(Collect("dead"))
    return _COLLECTED.pop("changelog", []), _COLLECTED.pop("dead", [])


def rows_for(changelog: list[dict], metric: str, granularity: str, window_start: float,
             dims: str | None = None) -> list[dict]:
    start = datetime.fromtimestamp(window_start, tz=UTC)
    rows = [r for r in changelog if r["metric"] == metric and r["granularity"] == granularity
            and r["window_start"] == start and (dims is None or r["dims"] == dims)]
    return sorted(rows, key=lambda r: (r["revision"], r["sign"]))
