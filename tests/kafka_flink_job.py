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

    .venv/bin/python tests/kafka_flink_job.py --replay_dir DIR --duckdb_path FILE \
        [more job args]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from pipeline import job  # noqa: E402
from pipeline.cli import configure_logging  # noqa: E402
from pipeline.publish import publish_to_kafka  # noqa: E402
from runners.flink import resolve_job_server_jar  # noqa: E402
from tests.servers import kafka_broker  # noqa: E402

TOPIC = "replay"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay_dir", required=True)
    args, job_args = parser.parse_known_args(argv)
    configure_logging()  # the job's own lines (progress, why it stopped) on stderr
    started = time.monotonic()
    with kafka_broker() as bootstrap:
        published = publish_to_kafka(bootstrap, TOPIC, args.replay_dir,
                                     timestamps="arrival")
        argv = resolve_job_server_jar([
            "--kafka_bootstrap", bootstrap, "--kafka_topic", TOPIC,
            "--runner=FlinkRunner", "--flink_version=1.19", "--flink_master=[local]",
            "--environment_type=LOOPBACK", *job_args])
        summary = job.run(argv, progress_every_s=30)
    print(json.dumps({
        "published": published.published,
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
