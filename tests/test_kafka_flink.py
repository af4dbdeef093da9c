"""Kafka → the streaming job on FlinkRunner, end to end: a generated day published in
arrival order (record timestamps = simulated arrival times) is read with ReadFromKafka,
the run stops itself once the topic is drained (--stop_when_idle_s), and the DuckDB sink
then equals the oracle. Every window is final (the watermark passed every horizon once
the topic was drained), the changelog sums to the latest values, every key has EARLY
revisions and exactly one ON_TIME, and every malformed line is a dead letter.

The dataset has no events past the allowed lateness (too_late_rate=0): the watermark is
the minimum over partitions of the newest record time read, so which events land past
it depends on how far each partition has been read, and no oracle independent of the
run could say which of them the windows drop (docs/streaming.md#too-late-events-on-flink).
Events hours and days late (inside the lateness) are there, but whether their panes come
out LATE depends on how far the job reads ahead of its watermark (the whole replay is in
the topic before it starts), so that replay asserts EARLY and one ON_TIME per key only.

The second replay makes LATE panes by construction, as a product's traffic does: every
line that arrived before a cut is published and read, and only once the job has
committed all of it are the lines that arrive later published (mostly devices syncing
hours or days late). By then the watermark has passed the newest record time of every
partition's first part, or the wall clock where that is earlier: KafkaIO's CreateTime
policy caps a partition's watermark at the wall clock while its newest record time is
ahead of it (the child reports that bound), so every window that ended
before it has had its on-time pane, and every such window the later lines change must
end on a LATE revision with the oracle's value. The simulated day is today's by the wall
clock, with the cut at least 10 minutes ahead of it: events may not be more than 24 h
ahead of processing time (schemas/event.avsc), and a caught-up KafkaIO reader moves its
watermark to the wall clock, which must not pass a line of the second part. Windows are
final only where the watermark passed their 3-day horizon, which here it has not.

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
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline import oracle
from pipeline.compare import (
    changelog_mismatches,
    differences,
    latest_from_duckdb,
    timing_violations,
    timings_by_key,
    timings_seen,
    windows_not_final,
)
from pipeline.generator import DEFAULT_FUNNEL, GeneratorConfig, read_truth, write_dataset
from pipeline.replay import read_arrivals
from tests.test_runner_prism import isolation_prefix, run_isolated
from transforms.sink_duckdb import read_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "kafka_flink_job.py"


REPLAY = GeneratorConfig(events=4000, seed=5, too_late_rate=0.0)
JOB_ARGS = ["--parallelism=2", "--checkpointing_interval=2000", "--max_bundle_size=100",
            "--early_firing_s", "1", "--late_firing_s", "1", "--max_run_s", "400"]


def replay_on_flink(tmp_path: Path, config: GeneratorConfig, *args: str
                    ) -> tuple[str, str, dict, str]:
    """Generate `config`, run tests/kafka_flink_job.py on it in the private namespace;
    (data dir, DuckDB path, the child's JSON, its stderr)."""
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
    write_dataset(data, config)
    db = str(tmp_path / "kafka.duckdb")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = run_isolated([*prefix, sys.executable, str(CHILD), "--replay_dir", data,
                         "--duckdb_path", db, *JOB_ARGS, *args], env, timeout_s=700)
    # Kept beside the DuckDB file: a wrong count is diagnosed from the job's own log.
    (tmp_path / "job.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return data, db, result, proc.stderr


@pytest.fixture(scope="module")
def kafka_replay(tmp_path_factory) -> tuple[str, str, dict, str]:
    return replay_on_flink(tmp_path_factory.mktemp("kafka_replay"), REPLAY,
                           "--stop_when_idle_s", "10")


@pytest.fixture(scope="module")
def late_syncs(tmp_path_factory) -> tuple[str, str, dict, int]:
    """Today's traffic published up to a cut (18 h into the day, or 10 minutes ahead of
    the wall clock if that is later), then the rest; (data, DuckDB, the child's JSON,
    the cut in epoch ms)."""
    now = datetime.now(UTC)
    # Just after midnight, today's latest events would be more than 24 h ahead.
    day = (now - timedelta(minutes=30)).date()
    day_start = datetime.combine(day, datetime.min.time(), UTC)
    cut = max(day_start + timedelta(hours=18), now + timedelta(minutes=10))
    cut_ms = int(cut.timestamp() * 1000)
    data, db, result, _ = replay_on_flink(
        tmp_path_factory.mktemp("late_syncs"),
        replace(REPLAY, seed=6, date=day.isoformat()),
        "--late_syncs_from_ms", str(cut_ms), "--stop_when_idle_s", "20")
    return data, db, result, cut_ms


def test_kafka_replay_on_flink_equals_the_oracle(kafka_replay) -> None:
    data, db, result, stderr = kafka_replay
    assert result["interfaces"] == ["lo"]
    assert result["state"].endswith("CANCELLED"), result["summary"]
    assert "drained" in stderr, stderr[-3000:]

    truth = read_truth(data)
    want = oracle.expected_metrics(truth, DEFAULT_FUNNEL)
    assert differences(latest_from_duckdb(db), want) == []
    assert changelog_mismatches(db) == []
    assert windows_not_final(db) == 0
    with open(os.path.join(data, "expected.json")) as f:
        expected = json.load(f)["counts"]
    assert read_rows(db, "SELECT count(*) FROM dead_letter") == [(expected["dead_letter"],)]
    assert result["published"] == expected["read"]


def test_kafka_replay_on_flink_gives_each_key_one_on_time_revision(kafka_replay) -> None:
    """Per window and key, in revision order: EARLY revisions, exactly one ON_TIME when
    the changelog stage sees the watermark pass the window end, then LATE ones; the
    final mark repeats the timing it closes. Before the watermark holds were lifted
    (docs/flink.md, finding 5) keys here went without an ON_TIME revision. Whether a
    late sync's pane comes after the stage saw the watermark pass (LATE) or before
    (folded into the ON_TIME value) depends on how far the job reads ahead: the whole
    replay is in the topic before the job starts, and runs here had LATE revisions in
    one run of three."""
    _, db, _, _ = kafka_replay
    assert timing_violations(db, one_on_time=True) == []
    assert {"EARLY", "ON_TIME"} <= timings_seen(db)


def test_late_syncs_on_flink_equal_the_oracle(late_syncs) -> None:
    data, db, result, cut_ms = late_syncs
    assert result["interfaces"] == ["lo"]
    assert result["state"].endswith("CANCELLED"), result["summary"]
    assert "error" not in result, result["error"]
    arrivals = [arrival for arrival, _ in read_arrivals(data)]
    assert result["late_syncs"] == sum(arrival >= cut_ms for arrival in arrivals) > 0
    assert result["published"] == len(arrivals)

    assert differences(latest_from_duckdb(db), oracle.expected_metrics(
        read_truth(data), DEFAULT_FUNNEL)) == []
    assert changelog_mismatches(db) == []
    with open(os.path.join(data, "expected.json")) as f:
        expected = json.load(f)["counts"]
    assert read_rows(db, "SELECT count(*) FROM dead_letter") == [(expected["dead_letter"],)]


def test_late_syncs_end_every_window_they_change_on_a_late_revision(late_syncs) -> None:
    """Per key: EARLY revisions, at most one ON_TIME, then LATE ones; exactly one ON_TIME
    where the window ended before the watermark the first part left; and where the lines
    published after the cut changed such a window that already had data, its last
    revision is LATE."""
    data, db, result, cut_ms = late_syncs
    passed = datetime.fromtimestamp(result["watermark_after_first_part_ms"] / 1000, UTC)
    truth = read_truth(data)
    everything = oracle.expected_metrics(truth, DEFAULT_FUNNEL)
    first_part = oracle.expected_metrics(
        [event for event in truth if event.arrival_ms < cut_ms], DEFAULT_FUNNEL)
    timings = timings_by_key(db)
    changed = {key for key, value in everything.items()
               if key in first_part and first_part[key] != value
               and timings[key][0] <= passed}

    assert timing_violations(db, require_final=False) == []
    closed = {key: seq for key, (end, seq) in timings.items() if end <= passed}
    assert closed and all(seq.count("ON_TIME") == 1 for seq in closed.values())
    assert changed, "the late syncs changed no window: nothing tests the late panes"
    assert {key: timings[key][1][-1] for key in changed} == dict.fromkeys(changed, "LATE")
    assert "LATE" in timings_seen(db)
