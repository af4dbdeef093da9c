"""Rescale through a savepoint, end to end on a Flink session cluster (benchmarks/rescale.py
as the runbook does it): the job at parallelism 1 outrun by a 5x burst, the lag alert
firing in a real Prometheus, a savepoint of the running job taken and the job cancelled,
a new job started from it at parallelism 2, and the sink then holding every unique event
sent: nothing lost, nothing doubled across the restart.

Three defects each broke this (docs/flink.md, findings 7-9): bundle outputs buffered in
snapshots (a restart loop), a `--savepoint_path` the Python FlinkRunner never shipped
(the new job started empty) and stop-with-savepoint, whose final watermark flushed and
cleared every window before the savepoint (short by exactly the first job's count).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.prometheus import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_savepoint_then_cancel_and_restart_at_higher_parallelism_counts_every_event(
        tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.rescale", "--rate", "2400", "--seconds", "40",
         "--parallelism", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=850, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(next(tmp_path.glob("results-rescale-*.json")).read_text())
    marks = result["marks_s"]
    assert marks["alert_firing"] < marks["savepoint_done"] < marks["job2_running"] \
        < marks["caught_up"]
    assert result["parallelism"] == [1, 2]
    assert result["sent"] > 100_000
    assert result["counted_in_sink"] == result["sent"]
