"""Prometheus exporter of a running job: its Beam metrics and its Kafka consumer lag.

`clickstream run ... --metrics_port N` starts an HTTP endpoint on --metrics_host
(127.0.0.1) that Prometheus scrapes (monitoring/prometheus.yml, rules in
monitoring/alerts.yml). A background thread polls the job's Beam metrics and, for a
Kafka run (--kafka_topic), the group's committed offsets against each partition's end
offset (read from the broker: the lag exists whether or not the runner reports Beam
metrics while the job runs); a scrape returns the latest poll. Series
(docs/operations.md says what each means):

  clickstream_events_read_total, _valid_total, _unique_total, clickstream_duplicates_total
  clickstream_dead_letters_total{reason}, clickstream_too_late_total{granularity}
  clickstream_sink_rows_total{sink,table}, clickstream_sink_retries_total{sink},
  clickstream_sink_retry_backoff_seconds_total{sink}
  clickstream_watermark_lag_seconds, clickstream_freshness_target_seconds
  clickstream_hot_key_share{dimension,key}, clickstream_suspected_bot_events_total
  clickstream_kafka_consumer_lag{group,topic,partition} (+ _committed_offset, _high_watermark)
  clickstream_<other Beam counter>_total
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from apache_beam.options.pipeline_options import PipelineOptions
from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline.kafka import PartitionLag, consumer_lag
from pipeline.options import KafkaOptions
from transforms.hot_keys import HOT_KEY_GAUGE_PREFIX, SHARE_SCALE
from transforms.parse import METRICS_NAMESPACE

log = logging.getLogger("clickstream")
DEFAULT_FRESHNESS_TARGET_S = 300
# A hot-key gauge not refreshed for this long describes a window long gone: not exported.
HOT_KEY_STALE_S = 600
# Beam's WriteToBigQuery DoFn counts the seconds it slept in backoff before retrying rows.
BIGQUERY_BACKOFF_COUNTER = "cumulativeThrottlingSeconds"


class MonitoringOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("monitoring")
        group.add_argument("--metrics_port", type=int, default=-1,
                           help="Serve the job's metrics for Prometheus on this port "
                                "(0: any free port, logged; -1: no exporter).")
        group.add_argument("--metrics_host", default="127.0.0.1",
                           help="Address the metrics endpoint binds to.")
        group.add_argument("--metrics_poll_s", type=float, default=5.0,
                           help="How often the exporter polls the job's metrics and the "
                                "consumer lag (seconds).")
        group.add_argument("--freshness_target_s", type=int,
                           default=DEFAULT_FRESHNESS_TARGET_S,
                           help="Watermark lag the job promises to stay under (seconds), "
                                "exported for the ClickstreamWatermarkLagHigh alert.")


class TopicLag(NamedTuple):
    """One partition's lag of one consumer group (pipeline/kafka.py reads it)."""

    group: str
    topic: str
    partition: PartitionLag


# --- Beam metrics → Prometheus families ------------------------------------------------

@dataclass
class Snapshot:
    """One poll: Beam counters and gauges by (namespace, name), Kafka lag, poll time."""

    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    gauges: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    partitions: list[TopicLag] = field(default_factory=list)
    polled_at: float = 0.0


def snapshot_of(query: dict[str, list]) -> Snapshot:
    """Beam's MetricResults query (every namespace) → a Snapshot: counters summed over
    steps; gauges the latest value (and its timestamp, seconds) over steps."""
    snapshot = Snapshot()
    for result in query.get("counters", []):
        value = result.committed if result.committed is not None else result.attempted
        key = (result.key.metric.namespace, result.key.metric.name)
        snapshot.counters[key] = snapshot.counters.get(key, 0) + int(value or 0)
    for result in query.get("gauges", []):
        value = result.committed if result.committed is not None else result.attempted
        if value is None or value.value is None:
            continue
        key = (result.key.metric.namespace, result.key.metric.name)
        stamp = _seconds(value.timestamp)
        if key not in snapshot.gauges or stamp > snapshot.gauges[key][1]:
            snapshot.gauges[key] = (int(value.value), stamp)
    return snapshot


def _seconds(stamp: Any) -> float:
    """A gauge's timestamp as Unix seconds: runners give a float, a datetime or a
    protobuf Timestamp."""
    if hasattr(stamp, "timestamp"):
        return float(stamp.timestamp())
    if hasattr(stamp, "seconds"):
        return stamp.seconds + stamp.nanos / 1e9
    return float(stamp or 0)


# Beam counter name (in the clickstream namespace) → (family, help, label names) for the
# names that carry a label after their first dot; the label values are the dotted rest.
_LABELLED_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dead_letter": ("clickstream_dead_letters", "Records dead-lettered, by reason.",
                    ("reason",)),
    "too_late": ("clickstream_too_late", "Unique events past the allowed lateness of "
                 "their window (archived, not counted), by granularity.", ("granularity",)),
    "sink_retries": ("clickstream_sink_retries", "Sink write attempts retried, by sink.",
                     ("sink",)),
    "duckdb_rows": ("clickstream_sink_rows", "Rows written, by sink and table.", ("table",)),
    "bigquery_rows": ("clickstream_sink_rows", "Rows written, by sink and table.",
                      ("table",)),
    "bigquery_insert_failed": ("clickstream_sink_rows_failed", "Rows a sink refused "
                               "(dead-lettered), by sink and table.", ("table",)),
}
# Counters whose Prometheus name says more than the Beam one.
_RENAMED_COUNTERS = {
    "read": "clickstream_events_read",
    "valid": "clickstream_events_valid",
    "unique": "clickstream_events_unique",
    "duplicates": "clickstream_duplicates",
    "bigtable_rows_to_write": "clickstream_bigtable_rows_to_write",
    "suspected_bot": "clickstream_suspected_bot_events",
}
_SINK_OF_PREFIX = {"duckdb_rows": "duckdb", "bigquery_rows": "bigquery",
                   "bigquery_insert_failed": "bigquery"}


def _metric_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def families(snapshot: Snapshot, freshness_target_s: int,
             now: float | None = None) -> Iterator[Metric]:
    """The Prometheus metric families of one snapshot."""
    now = time.time() if now is None else now
    counters: dict[str, CounterMetricFamily] = {}

    def counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
        if name not in counters:
            counters[name] = CounterMetricFamily(name, doc, labels=list(labels))
        return counters[name]

    for (namespace, name), value in sorted(snapshot.counters.items()):
        if namespace != METRICS_NAMESPACE:
            if name == BIGQUERY_BACKOFF_COUNTER and "BigQueryWriteFn" in namespace:
                counter("clickstream_sink_retry_backoff_seconds",
                        "Seconds sinks slept in backoff before retrying writes, by sink.",
                        ("sink",)).add_metric(["bigquery"], value)
            continue
        prefix, _, rest = name.partition(".")
        if rest and prefix in _LABELLED_COUNTERS:
            family, doc, labels = _LABELLED_COUNTERS[prefix]
            sink = _SINK_OF_PREFIX.get(prefix)
            if sink is not None:
                counter(family, doc, ("sink", *labels)).add_metric([sink, rest], value)
            else:
                counter(family, doc, labels).add_metric([rest], value)
        elif name == "dead_letter":
            continue  # the sum of dead_letter.<reason>, exported by reason
        else:
            family = _RENAMED_COUNTERS.get(name, "clickstream_" + _metric_name(name))
            counter(family, f"Beam counter {METRICS_NAMESPACE}/{name}.").add_metric([], value)
    yield from counters.values()

    lag = snapshot.gauges.get((METRICS_NAMESPACE, "watermark_lag_s"))
    if lag is not None:
        yield GaugeMetricFamily("clickstream_watermark_lag_seconds",
                                "Wall clock minus the event-time watermark at the last "
                                "sample (transforms/freshness.py).", value=lag[0])
    yield GaugeMetricFamily("clickstream_freshness_target_seconds",
                            "The watermark lag the job promises to stay under.",
                            value=freshness_target_s)
    shares = GaugeMetricFamily("clickstream_hot_key_share",
                               "Share of a window's events taken by one key, for keys "
                               "above the reporting share (transforms/hot_keys.py).",
                               labels=["dimension", "key"])
    for (namespace, name), (value, stamp) in sorted(snapshot.gauges.items()):
        if namespace == METRICS_NAMESPACE and name.startswith(HOT_KEY_GAUGE_PREFIX) \
                and now - stamp <= HOT_KEY_STALE_S:
            dimension, _, key = name[len(HOT_KEY_GAUGE_PREFIX):].partition(".")
            shares.add_metric([dimension, key], value / SHARE_SCALE)
    yield shares

    if snapshot.partitions:
        partition_labels = ["group", "topic", "partition"]
        lag_family = GaugeMetricFamily("clickstream_kafka_consumer_lag",
                                       "Records of a partition the consumer group has not "
                                       "committed yet (high watermark - committed offset).",
                                       labels=partition_labels)
        committed = GaugeMetricFamily("clickstream_kafka_committed_offset",
                                      "The consumer group's committed offset (-1: none).",
                                      labels=partition_labels)
        high = GaugeMetricFamily("clickstream_kafka_high_watermark",
                                 "The partition's high watermark (next offset written).",
                                 labels=partition_labels)
        for group, topic, p in snapshot.partitions:
            values = [group, topic, str(p.partition)]
            lag_family.add_metric(values, p.lag)
            committed.add_metric(values, -1 if p.committed is None else p.committed)
            high.add_metric(values, p.end_offset)
        yield from (lag_family, committed, high)
    if snapshot.polled_at:
        yield GaugeMetricFamily("clickstream_exporter_last_poll_timestamp_seconds",
                                "When the exporter last polled the job (Unix time).",
                                value=snapshot.polled_at)


class _SnapshotCollector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        return families(self._exporter.snapshot, self._exporter.freshness_target_s)


class MetricsExporter:
    """Serves /metrics on host:port and keeps its snapshot fresh from `poll`.

    `poll` returns a new Snapshot (e.g. from a PipelineResult's metrics, see
    `poll_job`); it runs on a background thread every `every_s` seconds, so a slow
    metrics query never blocks a scrape. Use as a context manager, or start()/stop().
    """

    def __init__(self, poll: Callable[[], Snapshot], port: int = 0,
                 host: str = "127.0.0.1", every_s: float = 5.0,
                 freshness_target_s: int = DEFAULT_FRESHNESS_TARGET_S) -> None:
        self._poll = poll
        self._requested_port = port
        self.host = host
        self.every_s = every_s
        self.freshness_target_s = freshness_target_s
        self.snapshot = Snapshot()
        self.port = 0
        self.poll_errors = 0
        self._stop = threading.Event()
        self._server: Any = None
        self._poller: threading.Thread | None = None

    def start(self) -> MetricsExporter:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(self))
        self._server, _ = start_http_server(self._requested_port, addr=self.host,
                                            registry=registry)
        self.port = self._server.server_port
        self.poll_once()
        self._poller = threading.Thread(target=self._loop, name="metrics-exporter",
                                        daemon=True)
        self._poller.start()
        log.info("metrics for Prometheus on http://%s:%d/metrics", self.host, self.port)
        return self

    def poll_once(self) -> None:
        try:
            snapshot = self._poll()
        except Exception as exc:  # a failed poll keeps the last snapshot
            self.poll_errors += 1
            log.warning("metrics exporter: poll failed (%s); serving the last values", exc)
            return
        snapshot.polled_at = time.time()
        self.snapshot = snapshot

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=self.every_s + 15)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> MetricsExporter:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def poll_job(metrics: Callable[[], Any],
             lag: Callable[[], list[TopicLag]] | None = None) -> Callable[[], Snapshot]:
    """A poll function for a running job: its Beam metrics (all namespaces) from
    `metrics()` (a MetricResults, e.g. ``result.metrics``) and, when given, the consumer
    lag. Either failing leaves only itself out of that poll (logged): a job whose runner
    has no Beam metrics yet still exports its lag, and a broker hiccup hides no counter."""

    def poll() -> Snapshot:
        try:
            snapshot = snapshot_of(metrics().query())
        except Exception as exc:
            if lag is None:
                raise
            # No Beam metrics (yet): the lag, read from the broker, still goes out.
            log.warning("metrics exporter: Beam metrics unavailable (%s)", exc)
            snapshot = Snapshot()
        if lag is not None:
            try:
                snapshot.partitions = lag()
            except Exception as exc:
                log.warning("metrics exporter: consumer lag unavailable (%s)", exc)
        return snapshot

    return poll


def exporter_for(metrics: Callable[[], Any], options: PipelineOptions
                 ) -> MetricsExporter | None:
    """The exporter the --metrics_* and --lag_* flags ask for, started, or None.
    `metrics()` returns the running job's MetricResults."""
    monitoring = options.view_as(MonitoringOptions)
    if monitoring.metrics_port < 0:
        return None
    kafka = options.view_as(KafkaOptions)
    lag = None
    if kafka.kafka_topic:
        bootstrap, topic, group = kafka.kafka_bootstrap, kafka.kafka_topic, kafka.kafka_group

        def lag() -> list[TopicLag]:
            return [TopicLag(group, topic, p) for p in consumer_lag(bootstrap, topic, group)]

    return MetricsExporter(poll_job(metrics, lag), monitoring.metrics_port,
                           monitoring.metrics_host, monitoring.metrics_poll_s,
                           monitoring.freshness_target_s).start()
