"""Kafka → the streaming job on FlinkRunner, end to end: a generated day published in
arrival order (record timestamps = simulated arrival times) is read with ReadFromKafka,
the run stops itself once the topic is drained (--stop_when_idle_s), and the DuckDB sink
then equals the oracle, where the oracle drops exactly the events that arrive after
their windows' allowed lateness, by the replay's rule (tests/test_replay.py) with the
watermark at each record's arrival time: the source's watermark follows CreateTime with
zero out-of-orderness. Every window is final (the watermark passed every horizon once
the topic was drained), the changelog sums to the latest values, and early, on-time and
late panes all occurred.

The job runs in a child process (tests/kafka_flink_job.py) in a private network
namespace with only loopback up (tests/test_runner_prism.py's isolation_prefix): the
broker, the Java expansion service, Flink's job server and the LOOPBACK worker all live
there. The job server jar (with KafkaIO) comes from scripts/fetch_flink_jobserver, the
broker's jars from scripts/kafka, both cached in .cache/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import oracle
from pipeline.compare import (
    changelog_mismatches,
    differences,
    latest_from_duckdb,
    windows_not_final,
)
from pipeline.generator import DEFAULT_FUNNEL, GeneratorConfig, read_truth, write_dataset
from pipeline.replay import watermark_at
from tests.test_runner_prism import isolation_prefix, run_isolated
from transforms.sink_duckdb import read_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "kafka_flink_job.py"
LATENESS_S = 3 * 86400
SIZES_MS = {"hour": 3_600_000, "day": 86_400_000}


def test_kafka_replay_on_flink_equals_the_oracle(tmp_path) -> None:
    prefix = isolation_prefix()
    if prefix is None:
        pytest.fail("no private network namespace (unshare/ip missing or not permitted): "
                    "the LOOPBACK worker and expansion service would listen on every "
                    "interface", pytrace=False)
    # Prepare outside the namespace (it has no route to the Maven registry): the
    # broker's jars and the job server jar, both cached.
    subprocess.run([str(ROOT / "scripts" / "kafka"), "prepare"], check=True, timeout=600)
    subprocess.run([str(ROOT / "scripts" / "fetch_flink_jobserver")], check=True,
                   timeout=900, stdout=subprocess.DEVNULL)
    data = str(tmp_path / "data")
    write_dataset(data, GeneratorConfig(events=4000, seed=5, too_late_rate=0.02))
    db = str(tmp_path / "kafka.duckdb")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = run_isolated([*prefix, sys.executable, str(CHILD), "--replay_dir", data,
                         "--duckdb_path", db, "--parallelism=2",
                         "--checkpointing_interval=2000", "--max_bundle_size=100",
                         "--early_firing_s", "1", "--late_firing_s", "1",
                         "--stop_when_idle_s", "10", "--max_run_s", "400"],
                        env, timeout_s=700)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["interfaces"] == ["lo"]
    assert result["state"].endswith("CANCELLED"), result["summary"]
    assert "drained" in proc.stderr, proc.stderr[-3000:]

    def counted(event: oracle.TruthEvent, granularity: str) -> bool:
        size = SIZES_MS[granularity]
        window_end_s = (event.event_time_ms // size + 1) * size / 1000
        return window_end_s + LATENESS_S > watermark_at(event.arrival_ms, 1, 0)

    truth = read_truth(data)
    assert [e for e in truth if not counted(e, "day")], "no too-late events to drop"
    want = oracle.expected_metrics(truth, DEFAULT_FUNNEL, counted)
    assert differences(latest_from_duckdb(db), want) == []
    assert changelog_mismatches(db) == []
    assert windows_not_final(db) == 0
    timings = dict(read_rows(db, "SELECT timing, count(*) FROM metric_changelog "
                                 "WHERE sign > 0 GROUP BY timing"))
    assert timings.get("EARLY") and timings.get("ON_TIME") and timings.get("LATE"), timings
    with open(os.path.join(data, "expected.json")) as f:
        expected = json.load(f)["counts"]
    assert read_rows(db, "SELECT count(*) FROM dead_letter") == [(expected["dead_letter"],)]
    assert result["published"] == expected["read"]
