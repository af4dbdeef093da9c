"""The metrics exporter (pipeline/exporter.py) serving a real job's Beam metrics to a real
Prometheus: what Prometheus stores equals the job's counters and the input's own counts."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.exporter import MetricsExporter, Snapshot, TopicLag, families, poll_job
from pipeline.graph import ClickstreamMetrics
from pipeline.job import counters_of
from pipeline.kafka import PartitionLag
from tests.prometheus import prometheus
from tests.test_hot_keys import BOT, MINUTE_MS, make_events, to_line
from transforms.hot_keys import DetectHotKeys, HotKeyConfig
from transforms.metrics import MetricsConfig
from transforms.sink_duckdb import WriteToDuckDB
from transforms.sources import ReadEventFiles

MIN_EVENTS = 550  # per minute window; the dataset has ~600 a minute
MALFORMED = [b"not json at all", b'{"event_type": "tap"}', b"[1, 2]"]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """A bounded run of the real graph on ~6k events: a 30% bot device, 300 redelivered
    duplicates and three malformed records."""
    events = make_events(6_000, seed=9)
    out = tmp_path_factory.mktemp("exporter")
    lines = [to_line(e).encode() for e in events]
    lines += [to_line(e).encode() for e in random.Random(4).sample(events, 300)]
    lines += MALFORMED
    random.Random(5).shuffle(lines)
    (out / "events-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # The job's graph with the hot-key sketch on (build() leaves it out of bounded runs).
    p = beam.Pipeline(options=PipelineOptions(["--direct_num_workers=1"]))
    outputs = (p
               | ReadEventFiles(str(out / "events-*.jsonl"))
               | ClickstreamMetrics(MetricsConfig().for_bounded_input(), hot_keys=DetectHotKeys(
                   HotKeyConfig(min_share=0.1, min_events=MIN_EVENTS))))
    outputs | WriteToDuckDB(str(out / "out.duckdb"))
    result = p.run()
    result.wait_until_finish()
    return events, lines, result


def by_label(values: dict, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in values.items()}


@pytest.mark.integration
def test_prometheus_scrapes_the_jobs_metrics(finished_job) -> None:
    events, lines, result = finished_job
    counters = counters_of(result)
    with MetricsExporter(poll_job(result.metrics), port=0, every_s=0.5) as exporter, \
            prometheus([f"127.0.0.1:{exporter.port}"]) as prom:
        prom.wait_for("the exporter's target up", prom.targets_up, 30)
        read = prom.wait_for("events read", lambda: prom.query(
            "clickstream_events_read_total"), 30)
        # Equal to the job's own counters and to what was written into the input.
        assert list(read.values()) == [len(lines)] == [counters["read"]]
        assert list(prom.query("clickstream_events_unique_total").values()) == [len(events)]
        assert list(prom.query("clickstream_duplicates_total").values()) == [300]
        reasons = by_label(prom.query("clickstream_dead_letters_total"), "reason")
        assert reasons == {"malformed_json": 1, "missing_field.event_id": 1,
                           "not_an_object": 1}
        rows = by_label(prom.query("clickstream_sink_rows_total"), "table")
        assert rows["dead_letter"] == len(MALFORMED)
        assert list(prom.query("clickstream_freshness_target_seconds").values()) == [300]
        # Each hot-key gauge holds one of its key's window shares at or above 10%, and
        # every key with such a window has one (the oracle: exact counts per minute).
        shares = by_label(prom.query("clickstream_hot_key_share"), "key")
        per_window: dict[int, Counter] = defaultdict(Counter)
        for e in events:
            per_window[e.event_time_ms // MINUTE_MS][e.device_id] += 1
        oracle_shares: dict[str, set[float]] = defaultdict(set)
        for counts in per_window.values():
            total = sum(counts.values())
            for device, n in counts.items() if total >= MIN_EVENTS else ():
                if n >= 0.1 * total:
                    oracle_shares[device].add(n / total)
        assert BOT in shares and set(shares) == set(oracle_shares)
        for key, share in shares.items():  # exported in parts per million
            assert any(abs(share - want) <= 1e-6 for want in oracle_shares[key])
        up = prom.query('up{job="clickstream"}')
        assert list(up.values()) == [1.0]


def test_families_name_counters_and_consumer_lag() -> None:
    """The mapping from Beam names to Prometheus series, on a hand-made snapshot."""
    snapshot = Snapshot(
        counters={("clickstream", "read"): 10, ("clickstream", "dead_letter"): 2,
                  ("clickstream", "dead_letter.malformed_json"): 2,
                  ("clickstream", "too_late.hour"): 3,
                  ("clickstream", "sink_retries.duckdb"): 4,
                  ("clickstream", "bigquery_rows.metric_changelog"): 5,
                  ("apache_beam.io.gcp.bigquery.BigQueryWriteFn",
                   "cumulativeThrottlingSeconds"): 7,
                  ("other", "ignored"): 1},
        gauges={("clickstream", "watermark_lag_s"): (42, 0.0),
                ("clickstream", "hot_key_share.device_id.old"): (500_000, 0.0),
                ("clickstream", "hot_key_share.device_id.bot"): (300_000, 1000.0)},
        partitions=[TopicLag("g", "events", PartitionLag(0, 100, 90)),
                    TopicLag("g", "events", PartitionLag(1, 50, None))])
    got = {}
    for family in families(snapshot, 120, now=1100.0):
        for sample in family.samples:
            got[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert got[("clickstream_events_read_total", ())] == 10
    assert ("clickstream_dead_letter_total", ()) not in got  # only by reason
    assert got[("clickstream_dead_letters_total", (("reason", "malformed_json"),))] == 2
    assert got[("clickstream_too_late_total", (("granularity", "hour"),))] == 3
    assert got[("clickstream_sink_retries_total", (("sink", "duckdb"),))] == 4
    assert got[("clickstream_sink_rows_total",
                (("sink", "bigquery"), ("table", "metric_changelog")))] == 5
    assert got[("clickstream_sink_retry_backoff_seconds_total", (("sink", "bigquery"),))] == 7
    assert got[("clickstream_watermark_lag_seconds", ())] == 42
    assert got[("clickstream_freshness_target_seconds", ())] == 120
    # A gauge of a window long gone is not exported; the fresh one is, as a share.
    assert got[("clickstream_hot_key_share", (("dimension", "device_id"), ("key", "bot")))] \
        == 0.3
    assert not any(labels and ("key", "old") in labels for _, labels in got)
    lag = {dict(labels)["partition"]: v for (name, labels), v in got.items()
           if name == "clickstream_kafka_consumer_lag"}
    # Partition 1 has no committed offset: all of it is behind.
    assert lag == {"0": 10, "1": 50}


def test_lag_is_exported_while_the_runner_has_no_beam_metrics() -> None:
    def no_metrics():
        raise RuntimeError("the running job has reported no Beam metrics yet")

    poll = poll_job(no_metrics, lambda: [TopicLag("g", "t", PartitionLag(0, 10, 4))])
    snapshot = poll()
    assert snapshot.counters == {} and [p.partition.lag for p in snapshot.partitions] == [6]
    with pytest.raises(RuntimeError):  # without a lag to export, the failure is the poll's
        poll_job(no_metrics)()
