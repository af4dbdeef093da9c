#!/usr/bin/env python
"""Replay a generated dataset through Kafka into the streaming job on FlinkRunner and
print the run's summary as JSON (last line).

Not a pytest module: tests/test_kafka_flink.py runs it in a child process inside a
private network namespace with only loopback up, because Beam's LOOPBACK worker and the
Java expansion service listen on every interface; the broker must then live in the same
namespace, so this script starts it (scripts/kafka, a temporary state dir), publishes
the dataset with each record stamped with its simulated arrival time, runs
``clickstream run --kafka_bootstrap ... --stop_when_idle_s N`` (which cancels the job
once the topic is drained) and stops the broker.

``--late_syncs_from_ms T``: publish only the lines that arrived before T first; once the
job's group has committed all of them and SETTLE_S more seconds have passed, publish the
rest (with T ahead of the wall clock: the lines that arrive later, mostly devices
syncing late). A KafkaIO reader that has caught up moves its watermark to the wall
clock, so by then every window that ended before the wall clock has had its on-time
pane, and whatever the second part adds to such a window is late by construction, not
by how far the reader happened to read ahead.

    .venv/bin/python tests/kafka_flink_job.py --replay_dir DIR --duckdb_path FILE \
        [--late_syncs_from_ms T] [more job args]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from pipeline import job  # noqa: E402
from pipeline.cli import configure_logging  # noqa: E402
from pipeline.kafka import consumer_lag  # noqa: E402
from pipeline.publish import publish_to_kafka  # noqa: E402
from runners.flink import resolve_job_server_jar  # noqa: E402
from tests.servers import kafka_broker  # noqa: E402

TOPIC = "replay"
GROUP = "clickstream"  # the job's default --kafka_group
SETTLE_S = 8.0


def publish_late_syncs(bootstrap: str, replay_dir: str, since_ms: int, first_part: int,
                       newest_first_part_ms: int, started: float, report: dict,
                       timeout_s: float = 300.0) -> None:
    """Wait until the group has committed the first `first_part` records (the newest
    record time of the partition read least far: `newest_first_part_ms`), record how far
    the watermark has surely come, let it settle, then publish the lines that arrived at
    or after `since_ms`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            lags = consumer_lag(bootstrap, TOPIC, GROUP)
        except Exception:  # the group may not exist yet
            lags = []
        if lags and sum(lag.committed or 0 for lag in lags) >= first_part:
            break
        time.sleep(0.5)
    else:
        report["error"] = f"the job did not commit the first {first_part} records"
        return
    report["first_part_committed_after_s"] = round(time.monotonic() - started, 1)
    # KafkaIO's CreateTime policy caps a partition's watermark at the wall clock while its
    # newest record time is ahead of it (CustomTimestampPolicyWithLimitedDelay): today's
    # traffic up to the cut is mostly ahead, so the watermark has passed the newest record
    # time of every partition, or the wall clock, whichever is earlier.
    report["watermark_after_first_part_ms"] = min(
        newest_first_part_ms, int(time.time() * 1000))
    time.sleep(SETTLE_S)
    report["late_syncs"] = publish_to_kafka(bootstrap, TOPIC, replay_dir,
                                            timestamps="arrival",
                                            arrived=(since_ms, None)).published


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay_dir", required=True)
    parser.add_argument("--late_syncs_from_ms", type=int, default=None)
    args, job_args = parser.parse_known_args(argv)
    configure_logging()  # the job's own lines (progress, why it stopped) on stderr
    started = time.monotonic()
    report: dict = {}
    with kafka_broker() as bootstrap:
        published = publish_to_kafka(bootstrap, TOPIC, args.replay_dir,
                                     timestamps="arrival",
                                     arrived=(0, args.late_syncs_from_ms))
        if args.late_syncs_from_ms is not None:
            threading.Thread(target=publish_late_syncs, daemon=True, args=(
                bootstrap, args.replay_dir, args.late_syncs_from_ms, published.published,
                min(published.newest_by_partition.values()), started, report)).start()
        argv = resolve_job_server_jar([
            "--kafka_bootstrap", bootstrap, "--kafka_topic", TOPIC, "--kafka_group", GROUP,
            "--runner=FlinkRunner", "--flink_version=1.19", "--flink_master=[local]",
            "--environment_type=LOOPBACK", *job_args])
        summary = job.run(argv, progress_every_s=30)
    print(json.dumps({
        **report,
        "published": published.published + report.get("late_syncs", 0),
        "counters": summary.counters,
        "state": summary.state,
        "summary": summary.render(),
        "elapsed_s": round(summary.elapsed_s, 2),
        "wall_s": round(time.monotonic() - started, 2),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
