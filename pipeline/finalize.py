"""The daily finalize-and-correct job: recompute day D exactly from the raw archive and
write a correcting revision wherever the sinks hold something else.

    archive (event_date=D) ──► dedup(event_id) ──► hour & day metrics ──┐
                                                                       ├─► correct ──► that sink
    each sink's latest rows for D's windows ───────────────────────────┘   (BATCH / final)

The streaming graph drops events that arrive after their window's allowed lateness,
and (with `--distinct hll`) estimates distinct users; the archive has every unique
event, so this batch recompute is the exact answer for the day. It reuses the graph's
own stages (DeduplicateEvents, ComputeMetrics) with a bounded config, so it cannot
drift from the streaming definitions. Every configured sink (ClickstreamOptions.sinks:
DuckDB, and BigQuery and Bigtable when their flags are set) is read back and corrected
against its own rows, so each store ends at the exact answer even where the stores
disagreed before.

Run it after day D's lateness horizon (D + 1 day + allowed lateness), when the
streaming job will not write D's windows again; before it, finalize refuses unless
--force_before_horizon. Should a straggling pane still come,
its revision collides with the correction's and the sinks' keyed writes drop it (the
changelog stays consistent, the value stays the corrected one); the event is in the
archive, so running finalize again picks it up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.job import counters_of, explain_sink_failures
from pipeline.options import ClickstreamOptions
from transforms.archive import ReadRawArchive, day_glob
from transforms.correct import CorrectChangelog, ReadHeldRows, utc_now
from transforms.dedup import DeduplicateEvents
from transforms.metrics import ComputeMetrics, MetricPane
from transforms.notify import NotifyCorrections

# The store whose corrections the summary counts and --notify_topic announces (the
# others' counters carry a .bigquery / .bigtable suffix): DuckDB is always configured.
REFERENCE_SINK = "WriteDuckDB"


class FinalizeOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("finalize")
        group.add_argument("--date", default=None,
                           help="The UTC event date to finalize, YYYY-MM-DD.")
        group.add_argument("--notify_topic", default="",
                           help="Pub/Sub topic (projects/P/topics/T) that gets one JSON "
                                "message per corrected window (empty: none).")
        group.add_argument("--force_before_horizon", action="store_true", default=False,
                           help="Finalize although D's lateness horizon (D + 1 day + "
                                "--allowed_lateness_s) has not passed. The streaming job "
                                "may still revise D's windows; a pane it writes after this "
                                "finalize collides with the BATCH revision and is dropped "
                                "until finalize runs again.")


def day_bounds(day: str) -> tuple[datetime, datetime]:
    """[start, end) of a UTC date, as aware datetimes."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def horizon(day: str, allowed_lateness_s: int) -> datetime:
    """When the streaming job stops revising day D's windows: D's end + allowed lateness."""
    return day_bounds(day)[1] + timedelta(seconds=allowed_lateness_s)


def _in_day(start: datetime, end: datetime) -> Callable[[MetricPane], bool]:
    def keep(pane: MetricPane) -> bool:
        return start <= pane.window_start < end
    return keep


def build_finalize(p: beam.Pipeline | beam.pvalue.PBegin, options: ClickstreamOptions,
                   day: str,
                   clock: Callable[[], datetime] = utc_now, notify_topic: str = "",
                   bigquery_test_client: Any = None) -> None:
    """Recompute day D once, then correct every sink against what that sink holds:
    stores can disagree (a write that failed in one, a DuckDB file local to a worker),
    and a correction must retract the row *that* store's consumers read.
    ``bigquery_test_client``: tests only (see pipeline/job.py build)."""
    start, end = day_bounds(day)
    config = options.metrics_config().for_bounded_input()
    unique = (
        p
        | "ReadArchive" >> ReadRawArchive(options.archive_path, day)
        # The archive may hold an event twice: two runs over overlapping input, or a
        # too-late event redelivered after the stream's dedup state for the day expired.
        | "Dedup" >> DeduplicateEvents(config.allowed_lateness_s, options.dedup_buckets,
                                       bounded=True)).unique
    recomputed = (
        unique
        | "Metrics" >> ComputeMetrics(config)
        # The partition holds only day D's events; this keeps a misplaced file from
        # writing windows of another day.
        | "OnlyDay" >> beam.Filter(_in_day(start, end)))
    no_dead_letters = p | "NoDeadLetters" >> beam.Create([])
    for label, (sink, read_held, _) in options.stores(bigquery_test_client).items():
        store = label.removeprefix("Write")
        held = p | f"HeldIn{store}" >> ReadHeldRows(read_held, start, end)
        corrections = (recomputed, held) | f"CorrectFor{store}" >> CorrectChangelog(
            clock, counter_suffix="" if label == REFERENCE_SINK else f".{store.lower()}")
        (corrections, no_dead_letters) | label >> sink
        if notify_topic and label == REFERENCE_SINK:
            # One message per corrected window, not one per store.
            (corrections, no_dead_letters) | "NotifyCorrections" >> NotifyCorrections(
                notify_topic)


@dataclass
class FinalizeSummary:
    day: str
    counters: dict[str, int]
    elapsed_s: float
    state: str

    def render(self) -> str:
        c = self.counters
        return "\n".join([
            f"pipeline state: {self.state}",
            f"finalize {self.day}: archive {c.get('archive_read', 0):,} records = "
            f"{c.get('unique', 0):,} unique events + {c.get('duplicates', 0):,} "
            "stored twice",
            f"windows corrected (BATCH revision): {c.get('finalize_windows_corrected', 0):,}"
            f" (of which {c.get('finalize_keys_only_in_sink', 0):,} retracted to 0, "
            f"{c.get('finalize_keys_only_in_archive', 0):,} new to the sink)",
            f"windows equal, marked final: {c.get('finalize_windows_marked_final', 0):,}; "
            f"already final and equal: {c.get('finalize_windows_already_final', 0):,}",
            f"changelog rows written: {c.get('duckdb_rows.changelog', 0):,}",
            *([f"notifications published: {c['notifications_published']:,}"]
              if "notifications_published" in c else []),
            f"elapsed {self.elapsed_s:.1f} s",
        ])


def run_finalize(argv: Sequence[str], clock: Callable[[], datetime] = utc_now,
                 bigquery_test_client: Any = None) -> FinalizeSummary:
    options = PipelineOptions(list(argv))
    options.view_as(StandardOptions).streaming = False
    finalize_options = options.view_as(FinalizeOptions)
    day = finalize_options.date
    clickstream = options.view_as(ClickstreamOptions)
    if not day:
        raise SystemExit("--date YYYY-MM-DD is required: the UTC event date to finalize")
    day_bounds(day)  # a malformed date fails here, before anything runs
    closes = horizon(day, clickstream.allowed_lateness_s)
    if clock() < closes and not finalize_options.force_before_horizon:
        # Finalizing early marks windows final that the stream may still revise: a
        # consumer would read "final" and then see the number change.
        raise SystemExit(
            f"day {day} is still open: the streaming job may revise its windows until "
            f"{closes:%Y-%m-%d %H:%M} UTC (D + 1 day + --allowed_lateness_s "
            f"{clickstream.allowed_lateness_s} s). Run finalize after that, or pass "
            "--force_before_horizon to finalize now anyway.")
    if not clickstream.archive_path:
        raise SystemExit("--archive_path is required: the raw archive the streaming "
                         "job wrote (its --archive_path)")
    pattern = day_glob(clickstream.archive_path, day)
    if not FileSystems.match([pattern])[0].metadata_list:
        # Refuse rather than read "no events": that would retract the whole day.
        raise SystemExit(f"no archive files match {pattern}: nothing to finalize "
                         "(wrong --archive_path or --date?)")
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build_finalize(p, clickstream, day, clock, finalize_options.notify_topic,
                   bigquery_test_client)
    with explain_sink_failures(clickstream):
        result = p.run()
        state = result.wait_until_finish()
    return FinalizeSummary(day, counters_of(result), time.monotonic() - started,
                           str(state))
