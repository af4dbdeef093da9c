"""The consumer-lag alert end to end on the real job: a Kafka broker, the clickstream job
on FlinkRunner with its exporter, a real Prometheus evaluating monitoring/alerts.yml, and
the load generator outrunning the job. The alert must fire, resolve after the job has
caught up (consumer lag 0), and the sink must hold every unique event sent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.prometheus import REPO

pytestmark = pytest.mark.integration


def test_lag_alert_fires_under_load_and_resolves_after_catch_up(tmp_path) -> None:
    # The broker's jars come from the Maven registry, unreachable inside the namespace.
    subprocess.run([str(REPO / "scripts" / "kafka"), "prepare"], check=True,
                   capture_output=True, timeout=600)
    probe = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.lag_alert_probe",
                            str(tmp_path)], capture_output=True, text=True, timeout=900,
                           cwd=REPO)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-5000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    t = seen["events_s"]
    assert t["load_started"] < t["alert_firing"] < t["alert_resolved"] <= t["caught_up"] + 5
    assert seen["max_consumer_lag"] > 10_000  # the rule's threshold was crossed for real
    assert seen["counted_in_sink"] == seen["unique_sent"]  # nothing lost, nothing doubled
