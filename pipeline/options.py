"""Command-line options of the clickstream job, as Beam PipelineOptions."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.archive import DEFAULT_FILE_BUCKETS, WriteRawArchive, run_id_for
from transforms.dedup import DEFAULT_BUCKETS
from transforms.distinct import DEFAULT_LG_K
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig
from transforms.sink_duckdb import WriteToDuckDB

DAY_S = 86400


class ClickstreamOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("clickstream")
        group.add_argument("--input_files", default=None,
                           help="Glob of newline-delimited JSON event files (bounded run).")
        group.add_argument("--duckdb_path", default="clickstream.duckdb",
                           help="DuckDB file that receives metric_changelog, "
                                "metric_latest and dead_letter.")
        group.add_argument("--distinct", choices=("exact", "hll"), default="exact",
                           help="Distinct users: exact sets, or HLL sketches "
                                "(Apache DataSketches) for bounded state.")
        group.add_argument("--hll_lg_k", type=int, default=DEFAULT_LG_K,
                           help="log2 of HLL buckets; error ~1.04/sqrt(2^lg_k).")
        group.add_argument("--allowed_lateness_s", type=int, default=3 * DAY_S,
                           help="How long after a window ends late data still counts "
                                "(seconds; default 3 days).")
        group.add_argument("--early_firing_s", type=int, default=60,
                           help="Processing-time delay between early panes (0: none).")
        group.add_argument("--late_firing_s", type=int, default=60,
                           help="Processing-time delay that batches late data into one "
                                "late pane (0: a pane per late bundle).")
        group.add_argument("--funnel_steps", default=",".join(DEFAULT_FUNNEL),
                           help="Comma-separated event types of the funnel, in order.")
        group.add_argument("--dedup_buckets", type=int, default=DEFAULT_BUCKETS,
                           help="Hash buckets of event_id for dedup state; raise it so "
                                "each bucket-day holds at most ~100k ids.")
        # Empty strings, not None, for "unset": the flex template's metadata marks an
        # option without a default as required (tests/test_flex_template.py).
        group.add_argument("--archive_path", default="",
                           help="Base path (a local directory or gs://...) of the raw Avro "
                                "archive of unique events, by event_date/event_hour "
                                "(empty: no archive).")
        group.add_argument("--archive_buckets", type=int, default=DEFAULT_FILE_BUCKETS,
                           help="Archive files per event hour and run: event_ids are "
                                "hashed into this many.")
        group.add_argument("--archive_run_id", default="",
                           help="Names this run's archive files; re-running with the same "
                                "id rewrites them instead of adding copies. Empty: a hash "
                                "of --input_files for a bounded run, else a fresh id.")

    def raw_archive(self, bounded: bool) -> WriteRawArchive | None:
        """The raw archive stage for --archive_path, or None when it is empty."""
        if not self.archive_path:
            return None
        run_id = self.archive_run_id or None
        if run_id is None and bounded and self.input_files:
            run_id = run_id_for(self.input_files)
        return WriteRawArchive(self.archive_path, run_id=run_id,
                               buckets=self.archive_buckets, bounded=bounded)

    def sinks(self) -> dict[str, beam.PTransform]:
        """Every sink of (changelog rows, dead-letter rows), by step label. The bounded,
        streaming and finalize jobs all write through these, so each store receives the
        same rows, corrections included."""
        return {"WriteDuckDB": WriteToDuckDB(self.duckdb_path)}

    def metrics_config(self) -> MetricsConfig:
        return MetricsConfig(
            early_firing_s=self.early_firing_s,
            late_firing_s=self.late_firing_s,
            allowed_lateness_s=self.allowed_lateness_s,
            distinct=self.distinct,
            hll_lg_k=self.hll_lg_k,
            funnel_steps=tuple(s.strip() for s in self.funnel_steps.split(",") if s.strip()),
        )
