"""Replay a generated dataset as a stream, in arrival order (DirectRunner, Prism, Flink).

A TestStream advances the watermark with the simulated arrival clock (minus a lag, as
a source's watermark estimate would) and processing time in steps, so the graph shows
early panes while a window fills, the on-time pane when the watermark passes it, late
panes for devices that sync hours or days later, and drops data past the allowed
lateness. Each step is one TestStream event batch.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from pipeline.graph import ClickstreamMetrics, write_to_sinks
from pipeline.job import RunSummary, counters_of, explain_sink_failures
from pipeline.options import ClickstreamOptions
from runners.flink import use_job_server_tmpdir


class ReplayOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("replay")
        group.add_argument("--replay_dir", default=None,
                           help="A directory written by `clickstream generate`.")
        group.add_argument("--replay_step_s", type=int, default=900,
                           help="Simulated arrival seconds per TestStream step.")
        group.add_argument("--watermark_lag_s", type=int, default=300,
                           help="How far the watermark trails the arrival clock.")
        group.add_argument("--replay_limit", type=int, default=0,
                           help="Replay only the first N records (0: all).")


def watermark_at(arrival_ms: int, step_s: int, lag_s: int) -> float:
    """The watermark (epoch s) in force when a record with this arrival time is added:
    the start of its step minus the lag. Also used by tests for the oracle."""
    step_ms = step_s * 1000
    return (arrival_ms // step_ms * step_ms) / 1000.0 - lag_s


def read_arrivals(replay_dir: str, limit: int = 0) -> list[tuple[int, bytes]]:
    """(arrival ms, raw line) in arrival order, from the shards and arrival_ms.txt."""
    lines: list[bytes] = []
    for path in sorted(glob.glob(os.path.join(replay_dir, "events-*.jsonl"))):
        with open(path, "rb") as f:
            lines.extend(line.rstrip(b"\n") for line in f)
    with open(os.path.join(replay_dir, "arrival_ms.txt")) as f:
        arrivals = [int(x) for x in f]
    records = list(zip(arrivals, lines, strict=False))
    return records[:limit] if limit else records


def build_stream(records: Sequence[tuple[int, bytes]], step_s: int, lag_s: int,
                 processing_time: bool = True) -> TestStream:
    """The replay as a TestStream. ``processing_time=False`` leaves out the processing-
    time steps, for runners whose TestStream has none (Flink: "Advancing Processing time
    is not supported by the Flink Runner"); early panes then follow the real clock."""
    # Raw bytes with their coder named: a portable runner's Java side (Flink) decodes
    # the TestStream payload itself and cannot read the default pickled elements.
    stream = TestStream(coder=BytesCoder())
    step_ms = step_s * 1000
    i = 0
    while i < len(records):
        step_start = records[i][0] // step_ms * step_ms
        stream = stream.advance_watermark_to(watermark_at(records[i][0], step_s, lag_s))
        batch = []
        while i < len(records) and records[i][0] < step_start + step_ms:
            arrival, line = records[i]
            batch.append(TimestampedValue(line, arrival / 1000.0))
            i += 1
        # Processing time moves one early-firing period per step, so each step
        # produces a round of early (and late) panes for the windows it touched.
        stream = stream.add_elements(batch)
        if processing_time:
            stream = stream.advance_processing_time(61)
    return stream.advance_watermark_to_infinity().with_output_types(bytes)


def run_replay(argv: Sequence[str]) -> RunSummary:
    options = PipelineOptions(list(argv))
    options.view_as(StandardOptions).streaming = True
    if "--runner" not in " ".join(argv):
        options.view_as(StandardOptions).runner = "BundleBasedDirectRunner"
    use_job_server_tmpdir(options)
    replay = options.view_as(ReplayOptions)
    if not replay.replay_dir:
        raise SystemExit("--replay_dir is required (a directory written by "
                         "`clickstream generate`)")
    clickstream = options.view_as(ClickstreamOptions)
    config = clickstream.metrics_config()
    runner = options.view_as(StandardOptions).runner or ""
    if "BundleBasedDirectRunner" in str(runner) and config.late_firing_s > 0:
        # A processing-time late trigger stalls this runner ("Monitor task detected a
        # pipeline stall", docs/design.md#late-trigger-stall): late panes fire per late
        # bundle instead.
        logging.getLogger("clickstream").warning(
            "replay on the BundleBasedDirectRunner: using --late_firing_s 0 (a late pane "
            "per late bundle); a processing-time late trigger stalls this runner")
        config = dataclasses.replace(config, late_firing_s=0)
    records = read_arrivals(replay.replay_dir, replay.replay_limit)
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    changelog, dead_letters = (
        p
        | "ReplayArrivals" >> build_stream(records, replay.replay_step_s,
                                           replay.watermark_lag_s,
                                           processing_time="flink" not in str(runner).lower())
        | "Clickstream" >> ClickstreamMetrics(
            config, clickstream.dedup_buckets,
            archive=clickstream.raw_archive(bounded=False),
            privacy=clickstream.privacy_policy()))
    write_to_sinks((changelog, dead_letters), clickstream.sinks())
    with explain_sink_failures(clickstream):
        result = p.run()
        state = result.wait_until_finish()
    counters = counters_of(result)
    # The BundleBasedDirectRunner under-reports user counters for TestStream input
    # (measured: read 167 of 300), so the replay reconciles from what reached DuckDB.
    counters["read"] = len(records)
    return RunSummary(counters, time.monotonic() - started, str(state))


def replay_reconciliation(duckdb_path: str, summary: RunSummary) -> str:
    from transforms.sink_duckdb import read_rows

    dead = read_rows(duckdb_path, "SELECT count(*) FROM dead_letter")[0][0]
    counted = read_rows(duckdb_path, "SELECT coalesce(sum(value), 0) FROM metric_latest "
                                     "WHERE metric = 'events' AND granularity = 'day'")[0][0]
    return (f"replayed {summary.read:,} records in {summary.elapsed_s:.1f} s: "
            f"{counted:,} unique events counted in day windows, {dead:,} dead letters; "
            f"the remaining {summary.read - counted - dead:,} are duplicates or arrived "
            "after the allowed lateness (kept out of windows by design)")
