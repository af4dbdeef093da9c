"""Build and run the bounded job: files → ClickstreamMetrics → DuckDB, with a summary."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.graph import ClickstreamMetrics, write_to_sinks
from pipeline.options import ClickstreamOptions
from transforms.parse import METRICS_NAMESPACE
from transforms.progress import LogProgress
from transforms.sources import ReadEventFiles

log = logging.getLogger("clickstream")


@dataclass
class RunSummary:
    counters: dict[str, int]
    elapsed_s: float
    state: str

    @property
    def read(self) -> int:
        return self.counters.get("read", 0)

    @property
    def reconciles(self) -> bool:
        c = self.counters
        return c.get("read", 0) == (c.get("unique", 0) + c.get("duplicates", 0)
                                    + c.get("dead_letter", 0))

    def render(self) -> str:
        c = self.counters
        rate = self.read / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"pipeline state: {self.state}",
            f"read {c.get('read', 0):,} = unique valid {c.get('unique', 0):,}"
            f" + duplicates {c.get('duplicates', 0):,}"
            f" + dead letter {c.get('dead_letter', 0):,}"
            f"  [{'reconciled' if self.reconciles else 'DOES NOT RECONCILE'}]",
        ]
        reasons = {k.split(".", 1)[1]: v for k, v in c.items()
                   if k.startswith("dead_letter.")}
        if reasons:
            lines.append("dead letter by reason: " + ", ".join(
                f"{k}={v}" for k, v in sorted(reasons.items())))
        if "archive_events" in c:
            lines.append(f"raw archive: {c['archive_events']:,} events in "
                         f"{c.get('archive_files', 0):,} files")
        if c.get("too_late.hour") or c.get("too_late.day"):
            lines.append("too late for their windows (archived, not counted): "
                         f"{c.get('too_late.hour', 0):,} for the hour, "
                         f"{c.get('too_late.day', 0):,} for the day")
        lines.append(f"changelog rows: {c.get('changelog_revisions', 0):,} revisions, "
                     f"{c.get('changelog_retractions', 0):,} retractions, "
                     f"{c.get('windows_finalized', 0):,} windows final")
        lines.append(f"elapsed {self.elapsed_s:.1f} s, {rate:,.0f} events/s")
        return "\n".join(lines)


def counters_of(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    counters: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + value
    return counters


def build(p: beam.Pipeline, options: ClickstreamOptions) -> None:
    if not options.input_files:
        raise SystemExit("--input_files is required for a bounded run "
                         "(generate some with: clickstream generate --out DIR)")
    payloads = (p
                | "ReadFiles" >> ReadEventFiles(options.input_files)
                | "Progress" >> LogProgress("records read"))
    changelog, dead_letters = payloads | "Clickstream" >> ClickstreamMetrics(
        options.metrics_config().for_bounded_input(), options.dedup_buckets,
        archive=options.raw_archive(bounded=True))
    write_to_sinks((changelog, dead_letters), options.sinks())


def _report_progress(result: beam.runners.runner.PipelineResult, started: float,
                     stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            read = counters_of(result).get("read", 0)
        except Exception:
            continue
        elapsed = time.monotonic() - started
        log.info("progress: %s s, %s events read (%s/s)", f"{elapsed:.0f}", f"{read:,}",
                 f"{read / elapsed:,.0f}")


def run(argv: Sequence[str], progress_every_s: float = 10.0) -> RunSummary:
    options = PipelineOptions(list(argv))
    options.view_as(StandardOptions).streaming = False
    clickstream = options.view_as(ClickstreamOptions)
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build(p, clickstream)
    result = p.run()
    stop = threading.Event()
    reporter = threading.Thread(target=_report_progress,
                                args=(result, started, stop, progress_every_s), daemon=True)
    reporter.start()
    try:
        state = result.wait_until_finish()
    finally:
        stop.set()
    return RunSummary(counters_of(result), time.monotonic() - started, str(state))
