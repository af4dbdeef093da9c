"""Run inside a private network namespace (tests/test_flink_prometheus.py starts it with
`unshare -n`): a Flink session cluster with Flink's Prometheus reporter, a real
Prometheus scraping the JobManager's and TaskManagers' reporter ports, and a JSON line
of what Prometheus saw. The namespace because Flink 1.19's reporter binds every
interface (it takes a port, no host); inside, every interface is loopback.

    python -m tests.flink_prometheus_probe PLUGINS_DIR RUN_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPORTER_FACTORY = "org.apache.flink.metrics.prometheus.PrometheusReporterFactory"


def reporter_config(first_port: int, processes: int) -> dict[str, str]:
    """The session's extra config: one reporter port per process, from a range."""
    return {"metrics.reporter.prom.factory.class": REPORTER_FACTORY,
            "metrics.reporter.prom.port": f"{first_port}-{first_port + processes - 1}"}


def main(plugins: str, run_dir: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["FLINK_PLUGINS_DIR"] = plugins  # Flink finds the reporter plugin here
    from runners.flink_session import FlinkSession, Settings
    from tests.prometheus import prometheus
    from tests.servers import free_port

    first = free_port()
    ports = [first, first + 1, first + 2]  # JobManager and two TaskManagers
    session = FlinkSession(Path(run_dir))
    session.start(Settings(jm_memory="768m", tm_memory="1024m", taskmanagers=2,
                           extra_config=reporter_config(first, len(ports))))
    try:
        with prometheus([f"127.0.0.1:{p}" for p in ports], job="flink") as prom:
            up = prom.wait_for("three reporter targets up",
                               lambda: len(prom.targets_up()) == 3 or None, 60)
            registered = prom.wait_for("numRegisteredTaskManagers", lambda: prom.query(
                "flink_jobmanager_numRegisteredTaskManagers"), 30)
            print(json.dumps({"targets_up": bool(up),
                              "registered_taskmanagers": list(registered.values()),
                              "taskmanager_series": len(prom.query(
                                  "flink_taskmanager_Status_JVM_Memory_Heap_Used"))}),
                  flush=True)
    finally:
        session.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
