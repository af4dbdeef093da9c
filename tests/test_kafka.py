"""Kafka without Flink: the broker script, publishing a replay, the load generator, and
the source flags. A real broker (scripts/kafka) where one is used; read back with a
plain confluent-kafka consumer, independent of the code under test."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.generator import GeneratorConfig, write_dataset
from pipeline.job import is_streaming, select_mode
from pipeline.load import HOT_DEVICE, Burst, LoadConfig, run_load
from pipeline.options import ClickstreamOptions
from pipeline.publish import identity_key
from pipeline.publish import main as publish_main
from pipeline.replay import read_arrivals
from runners.flink import CHECKPOINT_DIR, FlinkCheckpointOptions
from tests import servers
from tests.fixtures_servers import kafka_broker  # noqa: F401

ROOT = servers.REPO


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0
                ) -> list:
    """Every record of `topic` from the beginning (stops once `expected` were read)."""
    import time

    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    records = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=1.0):
                assert message.error() is None, message.error()
                records.append(message)
    finally:
        consumer.close()
    return records


@pytest.mark.integration
def test_scripts_kafka_starts_reports_and_stops_one_broker_by_pid(tmp_path) -> None:
    env = dict(os.environ, KAFKA_STATE_DIR=str(tmp_path))
    script = str(ROOT / "scripts" / "kafka")

    def kafka(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, command], env=env, capture_output=True, text=True,
                              timeout=180)

    started = kafka("start")
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    host, port = bootstrap.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    try:
        pid = int((tmp_path / "kafka.pid").read_text())
        assert kafka("status").stdout.startswith(f"running pid {pid} {bootstrap}")
        assert kafka("start").stdout.strip() == bootstrap  # idempotent
        config = (tmp_path / "server.properties").read_text()
        assert "listeners=PLAINTEXT://127.0.0.1:" in config
        assert "process.roles=broker,controller" in config  # KRaft, no ZooKeeper
        from confluent_kafka.admin import AdminClient

        assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
    finally:
        stopped = kafka("stop")
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    status = kafka("status")
    assert status.returncode == 3 and status.stdout.strip() == "stopped"


@pytest.mark.integration
def test_publish_sends_a_replay_in_arrival_order_keyed_by_device(
        tmp_path, kafka_broker: str) -> None:  # noqa: F811
    data = str(tmp_path / "data")
    write_dataset(data, GeneratorConfig(events=600, seed=2))
    records = read_arrivals(data)
    assert publish_main(["--kafka_bootstrap", kafka_broker, "--kafka_topic", "replay",
                         "--replay_dir", data]) == 0
    got = consume_all(kafka_broker, "replay", len(records))
    assert len(got) == len(records)
    # Each line once, with its arrival time as CreateTime and its device as key.
    want = Counter((arrival, payload, identity_key(payload)) for arrival, payload in records)
    assert Counter((m.timestamp()[1], m.value(), m.key()) for m in got) == want
    assert all(m.timestamp()[0] == 1 for m in got)  # TIMESTAMP_CREATE_TIME
    # Every partition in timestamp order: the source's zero out-of-orderness holds.
    for partition in {m.partition() for m in got}:
        stamps = [m.timestamp()[1] for m in got if m.partition() == partition]
        assert stamps == sorted(stamps)
    # One device, one partition.
    partitions: dict[bytes, set[int]] = {}
    for m in got:
        if m.key() is not None:
            partitions.setdefault(m.key(), set()).add(m.partition())
    assert partitions and all(len(p) == 1 for p in partitions.values())


@pytest.mark.integration
def test_publish_with_send_timestamps(tmp_path, kafka_broker: str) -> None:  # noqa: F811
    import time

    data = str(tmp_path / "data")
    write_dataset(data, GeneratorConfig(events=100, seed=4))
    before_ms = int(time.time() * 1000)
    assert publish_main(["--kafka_bootstrap", kafka_broker, "--kafka_topic", "now",
                         "--replay_dir", data, "--timestamps", "now", "--rate", "500"]) == 0
    after_ms = int(time.time() * 1000)
    got = consume_all(kafka_broker, "now", len(read_arrivals(data)))
    assert got and all(before_ms <= m.timestamp()[1] <= after_ms for m in got)


@pytest.mark.integration
def test_load_shapes_hot_key_late_syncs_and_duplicates(kafka_broker: str) -> None:  # noqa: F811
    config = LoadConfig(kafka_broker, "load", rate=1500, duration_s=4,
                        burst=Burst(3, 1, 1), hot_key_share=0.3, late_share=0.05,
                        duplicate_share=0.1, seed=7)
    summary = run_load(config)
    # Schedule: 1.5k/s for 4 s plus 2 x 1.5k more in the 1 s burst.
    assert summary.sent == pytest.approx(1500 * 4 + 3000, rel=0.05)
    assert summary.unique + summary.duplicates == summary.sent
    got = consume_all(kafka_broker, "load", summary.sent)
    assert len(got) == summary.sent
    events = [json.loads(m.value()) for m in got]
    ids = Counter(e["event_id"] for e in events)
    assert len(ids) == summary.unique
    assert sum(ids.values()) - len(ids) == summary.duplicates > 0
    hot = [m for m in got if m.key() == HOT_DEVICE.encode()]
    assert len({m.partition() for m in hot}) == 1
    assert 0.2 < len({json.loads(m.value())["event_id"] for m in hot}) / summary.unique < 0.4
    late = [e for e, m in zip(events, got, strict=True)
            if m.timestamp()[1] - e["event_time"] >= 3600_000]
    assert len({e["event_id"] for e in late}) == summary.late > 0


def test_burst_and_diurnal_rates() -> None:
    assert Burst.parse("5x:120s") == Burst(5, 120, None)
    assert Burst.parse("2.5x:30s@10s") == Burst(2.5, 30, 10)
    with pytest.raises(ValueError):
        Burst.parse("5:120")
    config = LoadConfig("b", "t", rate=100, duration_s=300, burst=Burst.parse("5x:120s"))
    assert config.rate_at(0) == 100 and config.rate_at(100) == 500
    assert config.rate_at(219.9) == 500 and config.rate_at(220) == 100
    diurnal = LoadConfig("b", "t", rate=100, duration_s=100, shape="diurnal")
    assert diurnal.rate_at(0) == pytest.approx(34) and diurnal.rate_at(50) == pytest.approx(166)


def test_identity_key_is_the_device() -> None:
    assert identity_key(b'{"device_id": "d1", "user_id": "u"}') == b"d1"
    assert identity_key(b'{"user_id": "u"}') is None
    assert identity_key(b"not json") is None


def _options(*argv: str) -> ClickstreamOptions:
    return PipelineOptions(list(argv)).view_as(ClickstreamOptions)


def test_kafka_flags_select_a_streaming_flink_run_that_checkpoints() -> None:
    from runners.flink import FlinkCheckpointOptions

    options = PipelineOptions(["--kafka_bootstrap", "127.0.0.1:1", "--kafka_topic", "t"])
    assert select_mode(options) is True
    assert options.view_as(FlinkCheckpointOptions).checkpointing_interval > 0
    assert options.get_all_options()["runner"] == "FlinkRunner"


@pytest.mark.parametrize(("argv", "want"), [
    ((), True),  # docs/flink.md, finding 7: outputs buffered in a snapshot came late
    (("--no-finish_bundle_before_checkpointing",), False),
    (("--finish_bundle_before_checkpointing",), True),
])
def test_streaming_flink_runs_finish_bundles_before_each_checkpoint(argv, want) -> None:
    from runners.flink import FlinkCheckpointOptions

    options = PipelineOptions(["--kafka_bootstrap", "127.0.0.1:1", "--kafka_topic", "t",
                               *argv])
    select_mode(options)
    assert options.view_as(FlinkCheckpointOptions).finish_bundle_before_checkpointing is want
    # What the job server receives: Java's FlinkPipelineOptions.finishBundleBeforeCheckpointing.
    assert options.get_all_options(retain_unknown_options=True)[
        "finish_bundle_before_checkpointing"] is want


def test_a_savepoint_path_reaches_the_job_server() -> None:
    """Beam's FlinkRunner (job-server mode) ships only declared options: an undeclared
    --savepoint_path was dropped and the 'restored' job started empty, its windows
    continuing from the stores' rows without the first job's counts."""
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    options = PipelineOptions(["--kafka_bootstrap", "127.0.0.1:1", "--kafka_topic", "t",
                               "--savepoint_path=file:/sp/savepoint-1",
                               "--allow_non_restored_state"])
    select_mode(options)
    handle = FlinkRunner().create_job_service_handle(None, options)
    shipped = options.get_all_options(retain_unknown_options=handle._retain_unknown_options)
    assert shipped["savepoint_path"] == "file:/sp/savepoint-1"
    assert shipped["allow_non_restored_state"] is True


def test_bounded_and_direct_runs_leave_the_flink_bundle_option_alone() -> None:
    from runners.flink import FlinkCheckpointOptions

    for argv in (["--input_files", "x", "--runner", "FlinkRunner"],
                 ["--input_subscription", "projects/p/subscriptions/s"]):
        options = PipelineOptions(argv)
        select_mode(options)
        assert options.view_as(FlinkCheckpointOptions).finish_bundle_before_checkpointing \
            is None


@pytest.mark.parametrize(("argv", "message"), [
    (("--kafka_topic", "t"), "go together"),
    (("--kafka_bootstrap", "h:1"), "go together"),
    (("--kafka_bootstrap", "h:1", "--kafka_topic", "t", "--input_files", "x"), "not both"),
    (("--input_files", "x", "--stop_when_idle_s", "5"), "applies to a Kafka run"),
])
def test_kafka_flags_are_refused_half_given(argv, message) -> None:
    with pytest.raises(SystemExit, match=message):
        is_streaming(_options(*argv))


def test_freshness_from_the_generators_progress() -> None:
    from benchmarks.streaming_kafka import freshness_from_progress, sustained

    progress = [(100.0, 0), (101.0, 10), (102.0, 20), (103.0, 30)]
    samples = [(99.0, 0), (101.5, 0), (102.5, 10), (103.0, 30), (104.0, 25)]
    # Before the first send: skipped. Showing none at 101.5: the first event went out at
    # 101. Showing 10 at 102.5: the 10th went out at 101. All shown: 0. 25 of 30 at 104:
    # the 25th went out at 103.
    assert freshness_from_progress(progress, samples) == [
        (101.5, 0.5), (102.5, 1.5), (103.0, 0.0), (104.0, 1.0)]
    assert sustained({"rate": 100, "sink_events_per_s": 95, "lag_p95_s": 5})
    assert not sustained({"rate": 100, "sink_events_per_s": 80, "lag_p95_s": 5})
    assert not sustained({"rate": 100, "sink_events_per_s": 100, "lag_p95_s": 61})


@pytest.mark.parametrize(("argv", "want"), [
    ((), True),
    (("--no-stable_sink_input",), False),
    (("--checkpointing_mode=AT_LEAST_ONCE",), False),
])
def test_streaming_flink_runs_write_only_checkpointed_rows(argv, want) -> None:
    """A restarted attempt recomputes panes with other contents than the failed one
    wrote; the sinks see only what a completed checkpoint holds (docs/flink.md,
    finding 10). Flink refuses stable input without exactly-once checkpoints."""
    options = PipelineOptions(["--kafka_bootstrap", "127.0.0.1:1", "--kafka_topic", "t",
                               *argv])
    select_mode(options)
    assert options.view_as(ClickstreamOptions).stable_sink_input is want


@pytest.mark.parametrize("argv, want", [
    ([], ("rocksdb", CHECKPOINT_DIR.as_uri())),
    (["--state_backend=filesystem"], ("filesystem", CHECKPOINT_DIR.as_uri())),
    (["--state_backend_storage_path=file:///shared/cp"], (None, "file:///shared/cp")),
])
def test_streaming_flink_runs_keep_checkpoints_on_disk(argv, want) -> None:
    """Flink's default checkpoint storage (the JobManager's memory) refuses operator
    state over 5 MB, and the job then restarts in a loop once dedup holds a few hundred
    thousand ids (docs/flink.md, finding 11): a checkpointing run gets RocksDB state in
    a local directory unless told otherwise."""
    options = PipelineOptions(["--kafka_bootstrap", "127.0.0.1:1", "--kafka_topic", "t",
                               *argv])
    select_mode(options)
    checkpoints = options.view_as(FlinkCheckpointOptions)
    assert (checkpoints.state_backend, checkpoints.state_backend_storage_path) == want


class _RowsSink(beam.PTransform):
    def expand(self, outputs):
        changelog, dead_letters = outputs
        changelog | "Changelog" >> beam.Map(str)
        dead_letters | "DeadLetters" >> beam.Map(str)
        return beam.pvalue.PDone(changelog.pipeline)


def test_stable_input_reaches_the_runner_on_its_own_stage() -> None:
    """The sink's input ParDo carries requires_stable_input in the proto the job server
    gets, behind a Reshuffle: fused into the keyed changelog stage instead, Flink's
    keyed stable-input buffer deadlocks on its state lock (docs/flink.md, finding 10)."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    from pipeline.graph import write_to_sinks

    p = beam.Pipeline()
    rows = p | "Rows" >> beam.Create([1])
    write_to_sinks((rows, p | "Dead" >> beam.Create([2])), {"Sink": _RowsSink()},
                   stable_input=True)
    proto = p.to_runner_api()
    stable = {}
    for tid, t in proto.components.transforms.items():
        if t.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            if payload.requires_stable_input:
                stable[tid] = t
    assert sorted(t.unique_name for t in stable.values()) == [
        "StableChangelog/PassThrough", "StableDeadLetters/PassThrough"]
    assert common_urns.requirements.REQUIRES_STABLE_INPUT.urn in proto.requirements
    reshuffles = {t.unique_name for t in proto.components.transforms.values()
                  if t.spec.urn == common_urns.composites.RESHUFFLE.urn}
    assert {"StableChangelog/NewStage", "StableDeadLetters/NewStage"} <= reshuffles
