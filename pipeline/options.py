"""Command-line options of the clickstream job, as Beam PipelineOptions."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.dedup import DEFAULT_BUCKETS
from transforms.distinct import DEFAULT_LG_K
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig

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

    def metrics_config(self) -> MetricsConfig:
        return MetricsConfig(
            early_firing_s=self.early_firing_s,
            late_firing_s=self.late_firing_s,
            allowed_lateness_s=self.allowed_lateness_s,
            distinct=self.distinct,
            hll_lg_k=self.hll_lg_k,
            funnel_steps=tuple(s.strip() for s in self.funnel_steps.split(",") if s.strip()),
        )
