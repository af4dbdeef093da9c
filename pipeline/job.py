"""Build and run the job: files (bounded) or Pub/Sub (streaming) → ClickstreamMetrics →
the sinks, with a summary."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricResults, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability import portable_runner
from google.api_core import exceptions as google_exceptions

from pipeline.exporter import exporter_for
from pipeline.graph import ClickstreamMetrics, write_to_sinks
from pipeline.kafka import consumer_lag, expansion_service
from pipeline.options import ClickstreamOptions, KafkaOptions
from schemas import METRICS_NAMESPACE
from transforms.metrics import MetricsConfig
from transforms.progress import LogProgress
from transforms.retract import HeldRows, held_by_window
from transforms.sources import ReadEventFiles, ReadEventMessages, ReadEventRecords

log = logging.getLogger("clickstream")
# Checkpoint period of a Kafka run that gives none: how often offsets are committed,
# hence how much a restart re-reads (the event_id dedup drops the re-reads).
KAFKA_CHECKPOINT_INTERVAL_MS = 10_000


@dataclass(frozen=True)
class SinkTally:
    """What reached the DuckDB sink: the reconciliation where the runner returns no
    counters. Unique valid events counted in day windows, dead letters by reason."""

    counted: int
    dead_letter_by_reason: dict[str, int]

    @property
    def dead_letter(self) -> int:
        return sum(self.dead_letter_by_reason.values())

    @classmethod
    def from_duckdb(cls, path: str) -> SinkTally:
        from transforms.sink_duckdb import read_rows

        counted = read_rows(path, "SELECT coalesce(sum(value), 0) FROM metric_latest "
                                  "WHERE metric = 'events' AND granularity = 'day'")[0][0]
        reasons = read_rows(path, "SELECT reason, count(*) FROM dead_letter GROUP BY 1")
        return cls(int(counted), {str(r): int(n) for r, n in reasons})


@dataclass
class RunSummary:
    counters: dict[str, int]
    elapsed_s: float
    state: str
    # Filled where the runner returned no counters and the run wrote a DuckDB file.
    sink: SinkTally | None = None

    @property
    def read(self) -> int:
        return self.counters.get("read", 0)

    @property
    def counters_available(self) -> bool:
        """Whether the runner returned the job's counters. A run that read anything
        counts `read`; none at all means the runner gave nothing back (Flink's job
        service has no metrics for a job it did not see finish)."""
        return "read" in self.counters

    @property
    def reconciles(self) -> bool:
        """read = unique + duplicates + dead letter, by the job's own counters; False
        when there are none (then the sink tally is what there is)."""
        c = self.counters
        return self.counters_available and c["read"] == (
            c.get("unique", 0) + c.get("duplicates", 0) + c.get("dead_letter", 0))

    def render(self) -> str:
        c = self.counters
        lines = [f"pipeline state: {self.state}"]
        if self.counters_available:
            lines.append(
                f"read {c['read']:,} = unique valid {c.get('unique', 0):,}"
                f" + duplicates {c.get('duplicates', 0):,}"
                f" + dead letter {c.get('dead_letter', 0):,}"
                f"  [{'reconciled' if self.reconciles else 'DOES NOT RECONCILE'}]")
            reasons = {k.split(".", 1)[1]: v for k, v in c.items()
                       if k.startswith("dead_letter.")}
        else:
            lines.append("counters unavailable on this runner (it returned no Beam "
                         "metrics for this job), so nothing reconciles by counters")
            reasons = self.sink.dead_letter_by_reason if self.sink else {}
            if self.sink:
                lines.append(f"from the sink: {self.sink.counted:,} unique valid events "
                             f"counted in day windows, {self.sink.dead_letter:,} dead "
                             "letters (duplicates and events too late for their windows "
                             "are not in the sink)")
            else:
                lines.append("no DuckDB sink to reconcile from: check the stores")
        if reasons:
            lines.append("dead letter by reason: " + ", ".join(
                f"{k}={v}" for k, v in sorted(reasons.items())))
        if not self.counters_available:
            lines.append(f"elapsed {self.elapsed_s:.1f} s")
            return "\n".join(lines)
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
        rate = self.read / self.elapsed_s if self.elapsed_s else 0.0
        lines.append(f"elapsed {self.elapsed_s:.1f} s, {rate:,.0f} events/s")
        return "\n".join(lines)


def summarize(result: beam.runners.runner.PipelineResult, elapsed_s: float, state: str,
              options: ClickstreamOptions) -> RunSummary:
    """The run's summary: its counters, or where the runner returned none, the tally of
    what reached the DuckDB sink."""
    counters = counters_of(result)
    summary = RunSummary(counters, elapsed_s, state)
    if not summary.counters_available and options.duckdb_path:
        summary.sink = SinkTally.from_duckdb(options.duckdb_path)
    return summary


def _metrics(result: beam.runners.runner.PipelineResult) -> MetricResults:
    # Beam's portable PipelineResult keeps its first GetJobMetrics answer for good; the
    # progress line asks while the job runs, and Flink's job service answers with the
    # job's metrics only once the job has finished. So ask again every time.
    if isinstance(result, portable_runner.PipelineResult):
        result._metrics = None
    return result.metrics()


def _live_metrics(result: beam.runners.runner.PipelineResult, options: PipelineOptions
                  ) -> Callable[[], MetricResults]:
    """How to read a running job's metrics: on a Flink cluster (--flink_master HOST:PORT)
    from its REST accumulators, since Flink's job service answers only for finished jobs;
    elsewhere from the result."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    master = options.view_as(FlinkRunnerOptions).flink_master
    if "Flink" in str(options.view_as(StandardOptions).runner) and master \
            and not master.startswith("["):
        from runners.flink_session import running_beam_metrics

        url = master if master.startswith("http") else f"http://{master}"
        return lambda: running_beam_metrics(url)
    return lambda: _metrics(result)


def _query(result: beam.runners.runner.PipelineResult) -> dict[str, list]:
    return _metrics(result).query(MetricsFilter().with_namespace(METRICS_NAMESPACE))


def _counters(query: dict[str, list]) -> dict[str, int]:
    counters: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + value
    return counters


def _watermark_lag(query: dict[str, list]) -> int | None:
    latest = None
    for gauge in query["gauges"]:
        if gauge.key.metric.name != "watermark_lag_s":
            continue
        value = gauge.committed if gauge.committed is not None else gauge.attempted
        if value is not None and (latest is None or value.timestamp > latest.timestamp):
            latest = value
    return None if latest is None else int(latest.value)


def counters_of(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    return _counters(_query(result))


def watermark_lag_s(result: beam.runners.runner.PipelineResult) -> int | None:
    """The latest `watermark_lag_s` gauge (transforms/freshness.py), or None before the
    first sample (and on bounded runs, which have none)."""
    return _watermark_lag(_query(result))


class SinkFailure(SystemExit):
    """A run failed in a store's writes; the message names the store and says what to
    do. A SystemExit, like the job's other errors meant for the user: the console
    script prints the message as its last line and exits with status 1."""


@contextlib.contextmanager
def explain_sink_failures(options: ClickstreamOptions) -> Iterator[None]:
    """Run a pipeline (``p.run()`` to ``wait_until_finish()``) inside this: a failure
    that a configured store recognizes as its own (``Store.explain_failure``) becomes a
    ``SinkFailure`` with that store's advice; any other failure passes unchanged."""
    try:
        yield
    except Exception as exc:
        for store in options.stores().values():
            advice = store.explain_failure(exc)
            if advice:
                log.error("the run failed in a sink", exc_info=exc)
                raise SinkFailure(f"run failed: {advice}") from exc
        raise


def build(p: beam.Pipeline, options: ClickstreamOptions, *,
          bigquery_test_client: Any = None,
          dedup: Callable[[MetricsConfig], beam.PTransform] | None = None) -> None:
    """The job's graph: the source the flags choose, the clickstream graph, the sinks.
    ``bigquery_test_client``: tests only, not a flag (Beam's ``WriteToBigQuery`` has no
    endpoint option; see transforms/sink_bigquery.py). ``dedup``: benchmarks only, makes
    the dedup stage from the run's metrics config (benchmarks/baseline.py)."""
    payloads, bounded = read_payloads(p, options)
    # Files read by a streaming job (Flink streaming, with checkpoints) are unbounded for
    # the graph: its bounded shortcuts (group once in the global window, re-stamp to
    # event times after) are right only where the runner groups everything at the end;
    # a streaming runner drops what they re-stamp behind its final watermark.
    bounded = bounded and not options.view_as(StandardOptions).streaming
    config = metrics_config(p, options, bounded)
    held = None if bounded else held_at_launch(
        options, config.allowed_lateness_s, datetime.now(UTC), bigquery_test_client)
    changelog, dead_letters = payloads | "Clickstream" >> ClickstreamMetrics(
        config, options.dedup_buckets, dedup=dedup(config) if dedup else None,
        archive=options.raw_archive(bounded=bounded), held=held,
        privacy=options.privacy_policy(),
        # Hot keys are a streaming concern (a partition, a lagging stage);
        # a bounded bundle spans many windows, where the sketch costs most.
        hot_keys=None if bounded else options.hot_key_detector(),
        bot_policy=options.bot_policy())
    write_to_sinks((changelog, dead_letters), options.sinks(bigquery_test_client),
                   stable_input=bool(options.stable_sink_input))


def held_at_launch(options: ClickstreamOptions, allowed_lateness_s: int, now: datetime,
                   bigquery_test_client: Any = None) -> HeldRows:
    """What the stores hold for the windows a streaming job can still revise (starting
    from a day before now - allowed lateness), read once at launch.

    A job launched with its state (a Flink savepoint, a Dataflow update) continues its
    windows from that state and never looks here. One launched without it (drained
    and relaunched, a savepoint forgotten) would restart their revisions at 1, below
    what the stores hold, where the keyed writes drop them: with this it continues
    above, retracts what the stores hold, and says so (transforms/retract.py)."""
    start = now - timedelta(seconds=allowed_lateness_s, days=2)
    end = now + timedelta(days=1)
    rows = []
    for label, store in options.stores(bigquery_test_client).items():
        try:
            rows.extend(store.read_held(start, end))
        except google_exceptions.NotFound:
            log.info("%s holds nothing yet (its table or dataset does not exist)", label)
    if rows:
        log.info("the stores hold %d rows of windows this job may revise; a window "
                 "without state will continue above their revisions", len(rows))
    return held_by_window(rows)


def is_streaming(options: ClickstreamOptions) -> bool:
    """Whether the source flags ask for a streaming job (--input_subscription, or
    --kafka_bootstrap with --kafka_topic) or a bounded one (--input_files); exactly one
    source must be given."""
    given = [flag for flag, on in (
        ("--input_files", options.input_files),
        ("--input_subscription", options.input_subscription),
        ("--kafka_topic", options.view_as(KafkaOptions).validate_kafka())) if on]
    if len(given) > 1:
        raise SystemExit(f"give one source: {' or '.join(given)}, not both")
    if not given:
        raise SystemExit("--input_files is required for a bounded run "
                         "(generate some with: clickstream generate --out DIR), or give "
                         "--input_subscription or --kafka_bootstrap with --kafka_topic "
                         "for a streaming one")
    return given[0] != "--input_files"


def select_mode(options: PipelineOptions) -> bool:
    """Set ``--streaming`` from the source flags and return it: True for
    --input_subscription, False for --input_files (both or neither: SystemExit).

    A streaming job without ``--runner`` gets the BundleBasedDirectRunner: the
    DirectRunner would first try to download Prism
    (docs/design.md#directrunner-picks-prism-first) and then fall back to that runner for a
    streaming job anyway. ``clickstream run`` and the flex template launcher
    both start here, so a launched job is set up as ``clickstream run`` sets it up; what
    depends on the runner (id_label only where honoured, the late trigger on the
    DirectRunner) is decided inside ``build``.
    """
    streaming = is_streaming(options.view_as(ClickstreamOptions))
    standard = options.view_as(StandardOptions)
    standard.streaming = streaming
    if options.view_as(KafkaOptions).kafka_topic:
        _kafka_defaults(options)
    elif streaming and not standard.runner:
        standard.runner = "BundleBasedDirectRunner"
    from runners.flink import use_job_server_tmpdir

    use_job_server_tmpdir(options)
    if streaming and "flink" in str(standard.runner).lower():
        _flink_streaming_defaults(options)
    return streaming


def _flink_streaming_defaults(options: PipelineOptions) -> None:
    """Finish bundles before each checkpoint barrier, let sinks write only what a
    completed checkpoint holds, and keep checkpoints in RocksDB on disk, unless told
    otherwise. Beam's Flink operator otherwise finishes an open bundle inside the
    snapshot, buffers its outputs, and may emit a newer watermark first: those outputs
    then reach the windows behind it, and after a large watermark step (a drained
    topic's partitions jump to the wall clock) past the allowed lateness, dropped
    (docs/flink.md, finding 7). Flink's own default checkpoint storage is the JobManager's
    memory, which refuses any operator state over 5 MB: the dedup ids of a few hundred
    thousand events, after which every checkpoint fails and the job restarts in a loop
    (docs/flink.md, finding 11)."""
    from runners.flink import CHECKPOINT_DIR, FlinkCheckpointOptions

    checkpoints = options.view_as(FlinkCheckpointOptions)
    if checkpoints.finish_bundle_before_checkpointing is None:
        checkpoints.finish_bundle_before_checkpointing = True
    clickstream = options.view_as(ClickstreamOptions)
    if clickstream.stable_sink_input is None:
        # Flink refuses stable input without exactly-once checkpoints; without
        # checkpoints a failed job restarts empty anyway (docs/flink.md, finding 10).
        clickstream.stable_sink_input = bool(checkpoints.checkpointing_interval) and (
            checkpoints.checkpointing_mode in (None, "EXACTLY_ONCE"))
    if checkpoints.checkpointing_interval and not checkpoints.state_backend_storage_path:
        if checkpoints.state_backend is None:
            checkpoints.state_backend = "rocksdb"
        checkpoints.state_backend_storage_path = CHECKPOINT_DIR.as_uri()
        log.info("checkpoints: %s state, stored in %s (a local directory: give "
                 "--state_backend_storage_path a shared one for a cluster)",
                 checkpoints.state_backend, CHECKPOINT_DIR)
    if checkpoints.savepoint_path:
        log.info("starting from savepoint %s: its windows, dedup state and source "
                 "positions", checkpoints.savepoint_path)


def _kafka_defaults(options: PipelineOptions) -> None:
    """A Kafka run is a FlinkRunner run (the cross-language read needs a portable runner
    with a Java environment) that checkpoints: offsets are committed only as
    checkpoints complete, so without checkpoints the group would never advance."""
    from runners.flink import FlinkCheckpointOptions

    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "FlinkRunner"
    checkpoints = options.view_as(FlinkCheckpointOptions)
    if checkpoints.checkpointing_interval is None:
        checkpoints.checkpointing_interval = KAFKA_CHECKPOINT_INTERVAL_MS


def read_payloads(p: beam.Pipeline, options: ClickstreamOptions
                  ) -> tuple[beam.PCollection, bool]:
    """The source the flags choose: (raw payloads, whether they are bounded)."""
    if is_streaming(options):
        kafka = options.view_as(KafkaOptions)
        source: beam.PTransform
        if kafka.kafka_topic:
            source = ReadEventRecords(kafka.kafka_bootstrap, kafka.kafka_topic,
                                      kafka.kafka_group, kafka.kafka_expansion_service)
            label = "ReadRecords"
        else:
            source = ReadEventMessages(options.input_subscription,
                                       options.timestamp_attribute, options.id_label)
            label = "ReadMessages"
        payloads = (p
                    | label >> source
                    | "Progress" >> LogProgress("messages read", every=10_000))
        return payloads, False
    # The file reader logs progress itself (no pass-through step per record).
    return p | "ReadFiles" >> ReadEventFiles(options.input_files), True


def metrics_config(p: beam.Pipeline, options: ClickstreamOptions,
                   bounded: bool) -> MetricsConfig:
    config = options.metrics_config()
    if bounded:
        return config.for_bounded_input()
    runner = type(p.runner).__name__
    if "DirectRunner" in runner and config.late_firing_s > 0:
        # The BundleBasedDirectRunner (where the DirectRunner runs a streaming job) stalls
        # on a processing-time late trigger ("Monitor task detected a pipeline stall",
        # docs/design.md#late-trigger-stall), as replay does: late panes fire per late
        # bundle instead. With the Pub/Sub source's wall-clock watermark, data older than
        # its window's end is late from the first message, so late panes are most of what
        # this runner emits.
        log.warning("streaming on the %s: using --late_firing_s 0 (a late pane per late "
                    "bundle); a processing-time late trigger stalls this runner", runner)
        config = dataclasses.replace(config, late_firing_s=0)
    return config


def _report_progress(result: beam.runners.runner.PipelineResult, started: float,
                     stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            query = _query(result)  # one metrics query a line
            counters, lag_s = _counters(query), _watermark_lag(query)
        except Exception:
            continue
        elapsed = time.monotonic() - started
        if "read" not in counters and lag_s is None:
            log.info("progress: %s s, job %s (this runner reports no counters while the "
                     "job runs)", f"{elapsed:.0f}", result.state)
            continue
        read = counters.get("read", 0)
        log.info("progress: %s s, %s events read (%s/s)%s", f"{elapsed:.0f}", f"{read:,}",
                 f"{read / elapsed:,.0f}",
                 "" if lag_s is None else f", watermark lag {lag_s:,} s")


def run(argv: Sequence[str], progress_every_s: float = 10.0) -> RunSummary:
    options = PipelineOptions(list(argv))
    if select_mode(options):
        return run_streaming(options, progress_every_s)
    clickstream = options.view_as(ClickstreamOptions)
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build(p, clickstream)
    stop = threading.Event()
    with explain_sink_failures(clickstream):
        result = p.run()
        exporter = exporter_for(_live_metrics(result, options), options)
        reporter = threading.Thread(target=_report_progress,
                                    args=(result, started, stop, progress_every_s),
                                    daemon=True)
        reporter.start()
        try:
            state = result.wait_until_finish()
        finally:
            stop.set()
            if exporter is not None:
                exporter.stop()
    return summarize(result, time.monotonic() - started, str(state), clickstream)


def _settle(result: beam.runners.runner.PipelineResult, timeout_s: float) -> None:
    """Wait (bounded) until the counters reconcile twice in a row: the messages already
    read have then passed parse and dedup, so the summary printed after cancel() does not
    show work caught in flight. Messages still arriving can keep it from settling."""
    deadline = time.monotonic() + timeout_s
    previous: dict[str, int] | None = None
    while time.monotonic() < deadline:
        try:
            counters = counters_of(result)
        except Exception:
            counters = {}
        # No counters at all: the runner returns none while the job runs (Flink).
        stable = counters == previous
        if stable and (not counters or RunSummary(counters, 0.0, "").reconciles):
            return
        previous = counters
        time.sleep(0.5)


def run_streaming(options: PipelineOptions, progress_every_s: float = 10.0,
                  stop: threading.Event | None = None, settle_s: float = 10.0,
                  graph: Callable[[beam.Pipeline, ClickstreamOptions], None] = build
                  ) -> RunSummary:
    """Run the streaming job until Ctrl-C, SIGTERM, --max_run_s or `stop`; then cancel it
    and summarize. A streaming pipeline never finishes by itself, so stopping is the
    normal end of a run, not an error. ``graph`` builds the job (benchmarks swap the
    dedup stage through it)."""
    if not select_mode(options):
        raise SystemExit("a streaming run reads --input_subscription or --kafka_topic")
    clickstream = options.view_as(ClickstreamOptions)
    kafka = options.view_as(KafkaOptions)
    stop = stop or threading.Event()
    reason: list[str] = []
    previous_handlers = _stop_on_signals(stop, reason)
    started = time.monotonic()
    resources = contextlib.ExitStack()
    try:
        if kafka.kafka_topic and not kafka.kafka_expansion_service:
            kafka.kafka_expansion_service = resources.enter_context(
                expansion_service(_job_server_jar(options)))
        p = beam.Pipeline(options=options)
        graph(p, clickstream)
        result = p.run()
        exporter = exporter_for(_live_metrics(result, options), options)
        if exporter is not None:
            resources.callback(exporter.stop)
        source = (f"Kafka topic {kafka.kafka_topic} at {kafka.kafka_bootstrap}"
                  if kafka.kafka_topic else clickstream.input_subscription)
        log.info("streaming from %s; stop with Ctrl-C or SIGTERM%s%s", source,
                 f" (or after {clickstream.max_run_s} s)" if clickstream.max_run_s else "",
                 f" (or once drained and idle for {kafka.stop_when_idle_s} s)"
                 if kafka.stop_when_idle_s else "")
        if kafka.stop_when_idle_s:
            idle = threading.Thread(target=_stop_when_drained,
                                    args=(kafka, stop, reason), daemon=True)
            idle.start()
        failure: list[BaseException] = []
        waiter = threading.Thread(target=_wait_for, args=(result, stop, failure),
                                  daemon=True)
        waiter.start()
        reporter = threading.Thread(target=_report_progress,
                                    args=(result, started, stop, progress_every_s),
                                    daemon=True)
        reporter.start()
        deadline = started + clickstream.max_run_s if clickstream.max_run_s else None
        # Short waits, not one long one, so the main thread runs the signal handlers.
        while not stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                reason.append(f"--max_run_s {clickstream.max_run_s} reached")
                break
        if failure:
            with explain_sink_failures(clickstream):
                raise failure[0]
        stop.set()
        log.info("stopping (%s): letting in-flight messages settle, then cancelling",
                 reason[0] if reason else "stop requested")
        _settle(result, settle_s)
        result.cancel()
        if "DirectRunner" in type(p.runner).__name__:
            log.warning("the DirectRunner's streaming runner under-reports Beam counters "
                        "(measured: 70 of 1,508 messages read): reconcile from the sink")
        state = str(result.state)
    finally:
        stop.set()
        resources.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return summarize(result, time.monotonic() - started, state, clickstream)


def _job_server_jar(options: PipelineOptions) -> str:
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    jar = options.view_as(FlinkRunnerOptions).flink_job_server_jar
    if not jar:
        raise SystemExit("a Kafka run needs --flink_job_server_jar (Beam's Flink job "
                         "server jar built with KafkaIO: it also serves the Kafka "
                         "expansion) or --kafka_expansion_service HOST:PORT")
    return str(jar)


def _stop_when_drained(kafka: KafkaOptions, stop: threading.Event, reason: list[str],
                       every_s: float = 1.0) -> None:
    """Set `stop` once the group's committed offsets reached the end of every partition
    and neither moved for --stop_when_idle_s. Offsets are committed as checkpoints
    complete, so by then every record has passed every stage once; the idle time lets
    the watermark-driven panes (on-time, final) that follow reach the sinks."""
    idle_since: float | None = None
    last: list[tuple[int, int | None]] | None = None
    while not stop.wait(every_s):
        try:
            lags = consumer_lag(kafka.kafka_bootstrap, kafka.kafka_topic, kafka.kafka_group)
        except Exception as exc:  # a broker hiccup: try again next period
            log.warning("consumer lag probe failed: %s", exc)
            continue
        now = [(lag.end_offset, lag.committed) for lag in lags]
        drained = bool(lags) and all(lag.lag == 0 for lag in lags)
        if not drained or now != last:
            idle_since = time.monotonic() if drained else None
            last = now
            continue
        if idle_since is not None and time.monotonic() - idle_since >= kafka.stop_when_idle_s:
            reason.append(f"drained {kafka.kafka_topic} ({sum(e for e, _ in now):,} "
                          f"records committed by group {kafka.kafka_group}) and idle for "
                          f"{kafka.stop_when_idle_s} s")
            stop.set()
            return


def _wait_for(result: beam.runners.runner.PipelineResult, stop: threading.Event,
              failure: list[BaseException]) -> None:
    """Surface a pipeline that ends (it failed, or was cancelled elsewhere) to the loop."""
    try:
        result.wait_until_finish()
    except BaseException as exc:  # re-raised in the main thread
        if not stop.is_set():
            failure.append(exc)
    stop.set()


def _stop_on_signals(stop: threading.Event, reason: list[str]) -> dict[int, Any]:
    """Ctrl-C and SIGTERM set `stop` once; a second Ctrl-C interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be installed from the main thread
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        reason.append(signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    return previous
