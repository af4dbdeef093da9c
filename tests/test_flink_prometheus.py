"""Flink's own Prometheus reporter (flink-metrics-prometheus, fetched by
scripts/fetch_flink_prometheus_reporter) on the session cluster, scraped by a real
Prometheus: the series the ClickstreamJobRestarts and ClickstreamCheckpointFailures rules
read come from this reporter. Runs in a private network namespace (the reporter binds
every interface)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.prometheus import REPO

pytestmark = pytest.mark.integration


def test_prometheus_scrapes_flinks_reporter_on_the_session_cluster(tmp_path) -> None:
    plugins = subprocess.run([str(REPO / "scripts" / "fetch_flink_prometheus_reporter")],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert shutil.which("unshare"), "needs unshare (util-linux) for a private network"
    probe = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.flink_prometheus_probe", plugins,
         str(tmp_path / "session")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["targets_up"]
    assert seen["registered_taskmanagers"] == [2.0]
    assert seen["taskmanager_series"] == 2  # one per TaskManager
