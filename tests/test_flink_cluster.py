"""The pipeline on a Flink 1.19 session cluster, as users deploy it, reading Kafka, and a
TaskManager lost under it mid-stream.

tests/flink_cluster_job.py (a child process in a private network namespace, only
loopback up) starts a Kafka broker and ``runners.flink_session`` (JobManager + 2
TaskManagers of 1 slot on 127.0.0.1, the project's loopback-only worker pool), submits
the clickstream graph with ``clickstream run`` as a streaming job on the topic
(parallelism 2, RocksDB, a checkpoint every 4 s, early and late panes every second)
after publishing a generated replay in arrival order. Once a checkpoint has completed,
the sink holds rows and 3 s have passed since the latest checkpoint, TaskManager 2 is
killed by PID (SIGKILL) and started again: the job restarts from its last completed
checkpoint and re-reads the topic from that checkpoint's offsets. When the DuckDB sink
holds every window final the job is cancelled and everything stopped. The final tables
must equal the oracle exactly: nothing lost, nothing counted twice, and the changelog
still sums to the latest values, although the restarted attempt recomputed panes the
failed one had fired (the sinks write only what a completed checkpoint holds:
docs/flink.md, finding 10). The run's figures (checkpoint interval, seconds from the
kill to the job running again from its checkpoint, seconds of processing replayed: from
that checkpoint's barrier to the kill) are printed, and written to the file
$FLINK_TM_LOSS_REPORT names, if set (benchmarks/results-flink-tm-loss-*.json).

The dataset has no events past the allowed lateness, as in tests/test_kafka_flink.py:
which of those a Kafka-fed watermark drops depends on how far each partition was read
(docs/streaming.md#too-late-events-on-flink).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.generator import GeneratorConfig, write_dataset
from runners import flink
from tests.test_flink_runner import assert_sink_equals_oracle, expected, fresh_duckdb
from tests.test_runner_prism import isolation_prefix, run_isolated

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "flink_cluster_job.py"
# Large enough that reading it outlasts the first checkpoints and panes written, so the
# kill lands mid-stream (the child fails if every window is final by then): a quiet
# machine read 20,000 events before the kill could land.
EVENTS = 60_000
SEED = 9
# The kill lands KILL_DELAY_S after the latest checkpoint completed: without stable sink input the
# sink has by then received panes the restart recomputes with other contents (measured:
# 109 changelog keys no longer summing to their latest value; docs/flink.md, finding 10).
CHECKPOINT_MS = 4000
KILL_DELAY_S = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("flink_cluster_data"))
    write_dataset(out, GeneratorConfig(events=EVENTS, seed=SEED, too_late_rate=0.0))
    return out


@pytest.fixture(scope="module")
def tm_loss_run(dataset: str, tmp_path_factory) -> tuple[dict[str, Any], str]:
    prefix = isolation_prefix()
    if prefix is None:
        pytest.fail("no private network namespace (unshare/ip missing or not permitted)",
                    pytrace=False)
    if not flink.job_server_jar_path().is_file():
        pytest.fail(f"no Flink job server jar at {flink.job_server_jar_path()}: run "
                    "scripts/fetch_flink_jobserver (scripts/test does)", pytrace=False)
    # The broker's jars, outside the namespace (it has no route to the Maven registry).
    subprocess.run([str(ROOT / "scripts" / "kafka"), "prepare"], check=True, timeout=600)
    run_dir = tmp_path_factory.mktemp("flink_cluster")
    db = fresh_duckdb(run_dir / "out.duckdb")
    want = expected(dataset)
    proc = run_isolated(
        [*prefix, sys.executable, str(CHILD), "--dir", str(run_dir),
         "--replay_dir", dataset, "--windows", str(len(want["metrics"])),
         "--checkpoint_ms", str(CHECKPOINT_MS), "--kill",
         "--kill_delay_s", str(KILL_DELAY_S)],
        dict(os.environ, PYTHONPATH=str(ROOT)), 840)
    if proc.returncode != 0:
        job_log = run_dir / "job.log"
        tail = job_log.read_text(errors="replace")[-3000:] if job_log.exists() else ""
        pytest.fail(f"the session-cluster run failed (exit {proc.returncode}); stderr "
                    f"tail:\n{proc.stderr[-4000:]}\njob log tail:\n{tail}", pytrace=False)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\nFlink session cluster, TaskManager loss:", json.dumps(report, indent=1))
    if os.environ.get("FLINK_TM_LOSS_REPORT"):
        report_path = Path(os.environ["FLINK_TM_LOSS_REPORT"])
        report_path.write_text(json.dumps({"events": EVENTS, "seed": SEED, "source": "kafka",
                                           "load_avg": os.getloadavg(),
                                           "cpus": os.cpu_count(), **report},
                                          indent=1, sort_keys=True) + "\n")
    return report, db


def test_job_ran_on_the_session_cluster_and_checkpointed(tm_loss_run) -> None:
    report, _ = tm_loss_run
    assert report["checkpoint_interval_ms"] == CHECKPOINT_MS
    assert "--environment_type=EXTERNAL" in report["submit_args"]
    assert any(a.startswith("--flink_master=127.0.0.1:") for a in report["submit_args"])
    assert report["checkpoints"]["completed"] >= 2
    assert report["job_state_before_cancel"] == "RUNNING"
    assert report["job_state"] == "CANCELED"


def test_lost_taskmanager_restarts_the_job_from_its_last_checkpoint(tm_loss_run) -> None:
    report, _ = tm_loss_run
    assert report["killed_pid"] > 0
    assert report["checkpoints"]["restored"] >= 1
    # Resumed from the checkpoint that was latest when the TaskManager died (or a later
    # one, if one completed between the kill and the failure being noticed).
    assert report["restored_checkpoint"] >= report["last_checkpoint_before_kill"]
    assert report["recovered_s"] < 120
    assert report["replayed_processing_s"] >= 0
    # Panes were written before the kill: the restart recomputed what came after its
    # checkpoint, and the sink had already received some of it.
    assert report["sink_rows_before_kill"] > 0


def test_every_record_was_published(dataset: str, tm_loss_run) -> None:
    report, _ = tm_loss_run
    assert report["published"] == expected(dataset)["counts"]["read"]


def test_final_tables_equal_the_oracle_after_the_loss(dataset: str, tm_loss_run) -> None:
    _, db = tm_loss_run
    # Nothing lost, nothing counted twice, no revision written twice with other values
    # (the changelog sums to every latest value).
    assert_sink_equals_oracle(dataset, db)


def test_cluster_stopped_cleanly(tm_loss_run) -> None:
    report, _ = tm_loss_run
    assert set(report["stopped"]) == {"jobmanager", "taskmanager-1", "taskmanager-2",
                                      "worker-pool"}
    assert report["still_running"] == {}
