"""Command-line options of the clickstream job, as Beam PipelineOptions."""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from transforms.archive import DEFAULT_FILE_BUCKETS, WriteRawArchive, run_id_for
from transforms.dedup import DEFAULT_BUCKETS
from transforms.distinct import DEFAULT_LG_K
from transforms.hot_keys import BotPolicy, DetectHotKeys, HotKeyConfig
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig
from transforms.pseudonymize import (
    KEY_ENV_DEFAULT,
    SESSION_ID_POLICIES,
    KeySource,
    PrivacyPolicy,
)
from transforms.sink_bigquery import WriteChangelogToBigQuery, read_latest_rows_from_bigquery
from transforms.sink_bigtable import (
    WriteChangelogToBigtable,
    read_latest_rows_from_bigtable,
)
from transforms.sink_bigtable import explain_failure as explain_bigtable_failure
from transforms.sink_duckdb import WriteToDuckDB, read_latest_rows

DAY_S = 86400


class ChangelogOnly(beam.PTransform):
    """(changelog rows, dead-letter rows) → a sink of changelog rows only (Bigtable
    serves metrics; dead letters are for the warehouses)."""

    def __init__(self, sink: beam.PTransform) -> None:
        super().__init__()
        self._sink = sink

    def expand(self, outputs: tuple[beam.PCollection, beam.PCollection]) -> Any:
        return outputs[0] | self._sink


def _unexplained(_error: BaseException) -> str | None:
    return None


class Store(NamedTuple):
    """One output store: its writer, the reader of its latest rows for the windows
    starting in [start, end) (as +1 changelog rows), and what to tell the user when a
    run failed in it (None: not this store's failure; see pipeline/job.py)."""

    sink: beam.PTransform
    read_held: Callable[[datetime, datetime], list]
    explain_failure: Callable[[BaseException], str | None] = _unexplained


class ClickstreamOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("clickstream")
        group.add_argument("--input_files", default=None,
                           help="Glob of newline-delimited JSON event files (bounded run).")
        group.add_argument("--duckdb_path", default="clickstream.duckdb",
                           help="DuckDB file that receives metric_changelog, "
                                "metric_latest and dead_letter (empty: no DuckDB sink, "
                                "as the streaming flex template sets on Dataflow, where "
                                "the file would be on each worker's disk).")
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
        group.add_argument("--stable_sink_input", action=argparse.BooleanOptionalAction,
                           default=None,
                           help="Sinks write only what a completed checkpoint holds, so a "
                                "restarted job replays the rows the failed attempt wrote, "
                                "never recomputed ones (Beam's RequiresStableInput; "
                                "needs exactly-once checkpoints; streaming Flink runs with "
                                "checkpoints default it on; docs/flink.md, finding 10).")
        group.add_argument("--funnel_steps", default=",".join(DEFAULT_FUNNEL),
                           help="Comma-separated event types of the funnel, in order.")
        group.add_argument("--events_dimensions", default="",
                           help="Comma-separated fields of schemas/event.avsc (e.g. "
                                "platform,country,app_version) that split the `events` "
                                "metric besides event_type; an event without one counts "
                                "under \"\" (empty: event_type only).")
        group.add_argument("--dedup_buckets", type=int, default=DEFAULT_BUCKETS,
                           help="Hash buckets of event_id for dedup state; raise it so "
                                "each bucket-day holds at most ~100k ids.")
        group.add_argument("--hot_key_window_s", type=int, default=60,
                           help="Event-time window of the streaming job's hot-key sketch "
                                "(seconds; 0: no hot-key detection; bounded runs have "
                                "none).")
        group.add_argument("--hot_key_min_share", type=float, default=0.05,
                           help="Report keys (devices) with at least this share of a "
                                "window's unique events.")
        group.add_argument("--hot_key_min_events", type=int, default=1000,
                           help="Report hot keys only for windows with at least this "
                                "many unique events.")
        group.add_argument("--bot_max_events", type=int, default=0,
                           help="Bot policy: a device with more unique events than this "
                                "in one --bot_window_s window is suspected automation; "
                                "its events of that window go to the dead letter "
                                "(reason suspected_automation) instead of the metrics "
                                "(0: no policy).")
        group.add_argument("--bot_window_s", type=int, default=60,
                           help="Event-time window of the bot policy (seconds).")
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
        group.add_argument("--bigtable_project", default="",
                           help="Google Cloud project of the Bigtable instance that serves "
                                "metric_latest to dashboards (empty: no Bigtable sink; "
                                "with BIGTABLE_EMULATOR_HOST set, any id works).")
        group.add_argument("--bigtable_instance", default="",
                           help="Bigtable instance id (must exist; on the emulator any id "
                                "works).")
        group.add_argument("--bigtable_table", default="",
                           help="Bigtable table id; created with its column family when "
                                "missing.")
        group.add_argument("--bigquery_dataset", default="",
                           help="BigQuery dataset that also receives metric_changelog, "
                                "dead_letter and the metric_latest view (created when "
                                "missing; empty: no BigQuery sink).")
        group.add_argument("--bigquery_project", default="",
                           help="Project of --bigquery_dataset (empty: --project).")

        # Streaming source (Pub/Sub). Empty strings are "off", as above.
        group.add_argument("--input_subscription", default="",
                           help="Pub/Sub subscription to read, projects/P/subscriptions/S: "
                                "a streaming run (instead of --input_files). Create it "
                                "before publishing; messages published earlier are lost "
                                "to a subscription made later.")
        group.add_argument("--timestamp_attribute", default="",
                           help="Message attribute (epoch ms or RFC 3339) the runner "
                                "estimates the watermark from; event time itself comes "
                                "from the payload (empty: the publish time).")
        group.add_argument("--id_label", default="",
                           help="Message attribute with a unique id for Pub/Sub-level "
                                "dedup, used where the runner supports it (Dataflow); "
                                "event_id dedup applies regardless (empty: none).")
        group.add_argument("--max_run_s", type=int, default=0,
                           help="Streaming run: cancel after this many seconds and print "
                                "the summary, as on Ctrl-C or SIGTERM (0: run until "
                                "stopped).")

    def raw_archive(self, bounded: bool) -> WriteRawArchive | None:
        """The raw archive stage for --archive_path, or None when it is empty."""
        if not self.archive_path:
            return None
        run_id = self.archive_run_id or None
        if run_id is None and bounded and self.input_files:
            run_id = run_id_for(self.input_files)
        return WriteRawArchive(self.archive_path, run_id=run_id,
                               buckets=self.archive_buckets, bounded=bounded)

    def hot_key_detector(self) -> DetectHotKeys | None:
        """The hot-key sketch stage, or None with --hot_key_window_s 0."""
        if self.hot_key_window_s <= 0:
            return None
        return DetectHotKeys(HotKeyConfig(window_s=self.hot_key_window_s,
                                          min_share=self.hot_key_min_share,
                                          min_events=self.hot_key_min_events))

    def bot_policy(self, clock: Callable[[], float] = time.time) -> BotPolicy | None:
        """The bot policy stage, or None with --bot_max_events 0. Its lateness covers the
        day windows' (a device-window ends before the day that holds it)."""
        if self.bot_max_events <= 0:
            return None
        return BotPolicy(self.bot_max_events, self.bot_window_s,
                         self.allowed_lateness_s + DAY_S, clock)

    def bigtable_target(self) -> tuple[str, str, str] | None:
        """(project, instance, table) of the Bigtable sink, or None when all three
        --bigtable_* flags are empty."""
        given = (self.bigtable_project, self.bigtable_instance, self.bigtable_table)
        if not any(given):
            return None
        if not all(given):
            # A half-configured sink would silently write nowhere: refuse it up front.
            raise SystemExit("--bigtable_project, --bigtable_instance and --bigtable_table "
                             "go together: give all three, or none for no Bigtable sink")
        return given

    def bigquery_target(self) -> tuple[str, str] | None:
        """(project, dataset) of the BigQuery sink, or None when --bigquery_dataset is empty.

        A project without a dataset is refused rather than ignored: a sink that was asked
        for must not be silently off.
        """
        if not self.bigquery_dataset:
            if self.bigquery_project:
                raise SystemExit("--bigquery_project needs --bigquery_dataset")
            return None
        project = self.bigquery_project or self.view_as(GoogleCloudOptions).project
        if not project:
            raise SystemExit("--bigquery_dataset needs --bigquery_project (or --project)")
        return project, self.bigquery_dataset

    def stores(self, bigquery_test_client: Any = None) -> dict[str, Store]:
        """Every configured store, by step label: how to write (changelog rows,
        dead-letter rows) to it, and how to read back what it holds (finalize corrects
        each store against its own rows). ``bigquery_test_client``: tests only (Beam's
        WriteToBigQuery has no endpoint option; see transforms/sink_bigquery.py)."""
        stores: dict[str, Store] = {}
        if self.duckdb_path:
            stores["WriteDuckDB"] = Store(WriteToDuckDB(self.duckdb_path),
                                          functools.partial(read_latest_rows, self.duckdb_path))
        bigtable = self.bigtable_target()
        if bigtable is not None:
            stores["WriteBigtable"] = Store(
                ChangelogOnly(WriteChangelogToBigtable(*bigtable, create_table=True)),
                functools.partial(read_latest_rows_from_bigtable, *bigtable),
                functools.partial(explain_bigtable_failure, *bigtable))
        bigquery = self.bigquery_target()
        if bigquery is not None:
            stores["WriteBigQuery"] = Store(
                WriteChangelogToBigQuery(*bigquery, test_client=bigquery_test_client),
                functools.partial(read_latest_rows_from_bigquery, *bigquery,
                                  client=bigquery_test_client))
        return stores

    def durable_stores(self) -> list[str]:
        """The configured stores that live outside the job's machines (BigQuery,
        Bigtable), by step label: what a job on managed workers must write to."""
        return [label for label in self.stores() if label != "WriteDuckDB"]

    def sinks(self, bigquery_test_client: Any = None) -> dict[str, beam.PTransform]:
        """Every store's writer, by step label. The bounded, streaming and finalize jobs
        all write through these, so each store receives the same rows."""
        return {label: store.sink for label, store in self.stores(bigquery_test_client).items()}

    def metrics_config(self) -> MetricsConfig:
        return MetricsConfig(
            early_firing_s=self.early_firing_s,
            late_firing_s=self.late_firing_s,
            allowed_lateness_s=self.allowed_lateness_s,
            distinct=self.distinct,
            hll_lg_k=self.hll_lg_k,
            funnel_steps=tuple(s.strip() for s in self.funnel_steps.split(",") if s.strip()),
            events_dimensions=_names(self.events_dimensions),
        )

    def privacy_policy(self) -> PrivacyPolicy:
        return self.view_as(PrivacyOptions).policy()


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


class PrivacyOptions(PipelineOptions):
    """What parse does to ids and properties before any stage stores them
    (transforms/pseudonymize.py; docs/privacy.md)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("privacy")
        group.add_argument("--pseudonymize_key_file", default="",
                           help="File holding the key (>= 32 bytes) that replaces user_id "
                                "and device_id by keyed HMAC-SHA-256 pseudonyms at parse "
                                "time, before dedup, the archive and every sink. Read by "
                                "each worker, never put in the job graph.")
        group.add_argument("--pseudonymize_key_env", default="",
                           help="Environment variable holding the key instead (e.g. "
                                f"{KEY_ENV_DEFAULT}).")
        group.add_argument("--pseudonymize_key_secret", default="",
                           help="Secret Manager secret version holding the key instead, "
                                "projects/P/secrets/S/versions/V (on Dataflow: the worker "
                                "service account needs secretmanager.versions.access).")
        group.add_argument("--session_ids", choices=SESSION_ID_POLICIES,
                           default="pseudonymize",
                           help="session_id: pseudonymized with the key (kept as sent "
                                "without one), kept, or dropped.")
        group.add_argument("--properties_allowlist", default="*",
                           help="Comma-separated property keys kept; every other property "
                                "is dropped before the archive and counted in "
                                "properties_dropped ('*': keep all; '': drop all).")

    def policy(self) -> PrivacyPolicy:
        sources = [KeySource(file=self.pseudonymize_key_file),
                   KeySource(env=self.pseudonymize_key_env),
                   KeySource(secret=self.pseudonymize_key_secret)]
        given = [source for source in sources if source != KeySource()]
        if len(given) > 1:
            raise SystemExit("give one of --pseudonymize_key_file, --pseudonymize_key_env "
                             "and --pseudonymize_key_secret")
        allowlist = (None if self.properties_allowlist.strip() == "*"
                     else frozenset(_names(self.properties_allowlist)))
        return PrivacyPolicy(key=given[0] if given else None, session_ids=self.session_ids,
                             properties_allowlist=allowlist)


class KafkaOptions(PipelineOptions):
    """The Kafka source: a streaming run that reads a topic with Beam's ReadFromKafka on
    FlinkRunner (docs/streaming.md)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("kafka")
        # Empty strings are "off", as for the other sources.
        group.add_argument("--kafka_bootstrap", default="",
                           help="Kafka bootstrap servers, HOST:PORT[,...] (with "
                                "--kafka_topic: a streaming run; `scripts/kafka start` "
                                "prints a local broker's).")
        group.add_argument("--kafka_topic", default="",
                           help="Topic to read (instead of --input_files or "
                                "--input_subscription).")
        group.add_argument("--kafka_group", default="clickstream",
                           help="Consumer group: offsets are committed to it as Flink "
                                "checkpoints complete; a restart resumes from there.")
        group.add_argument("--kafka_expansion_service", default="",
                           help="HOST:PORT of a running Beam Java expansion service with "
                                "KafkaIO (empty: the run starts one from "
                                "--flink_job_server_jar and stops it at the end).")
        group.add_argument("--stop_when_idle_s", type=int, default=0,
                           help="Kafka run: cancel (and print the summary) once the "
                                "group's committed offsets have reached the end of every "
                                "partition and nothing moved for this many seconds "
                                "(0: run until stopped).")

    def validate_kafka(self) -> bool:
        """Whether a Kafka source is asked for; a half-given one is refused."""
        if not (self.kafka_bootstrap or self.kafka_topic):
            if self.stop_when_idle_s:
                raise SystemExit("--stop_when_idle_s applies to a Kafka run "
                                 "(--kafka_bootstrap and --kafka_topic)")
            return False
        if not (self.kafka_bootstrap and self.kafka_topic):
            raise SystemExit("--kafka_bootstrap and --kafka_topic go together")
        if not self.kafka_group:
            raise SystemExit("--kafka_group must not be empty: offsets are committed "
                             "to it")
        return True
