"""The `clickstream` console script as a user runs it: generate, run, report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def clickstream(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("clickstream", path=os.path.dirname(sys.executable))
    command = [exe] if exe else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.integration  # two child processes, each starting Beam: >10 s
def test_generate_run_and_report_from_the_command_line(tmp_path) -> None:
    data, db = str(tmp_path / "events"), str(tmp_path / "out.duckdb")
    generated = clickstream("generate", "--out", data, "--events", "2000", "--seed", "9")
    assert generated.returncode == 0, generated.stderr
    assert "oracle in" in generated.stdout

    ran = clickstream("run", "--input_files", os.path.join(data, "events-*.jsonl"),
                      "--duckdb_path", db)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "[reconciled]" in ran.stdout
    assert "events/s" in ran.stdout
    assert "Daily metrics" in ran.stdout and "final" in ran.stdout

    report = clickstream("report", "--duckdb_path", db)
    assert report.returncode == 0, report.stderr
    assert "Hourly active users" in report.stdout


def test_a_missing_input_says_what_to_do(tmp_path) -> None:
    ran = clickstream("run", "--duckdb_path", str(tmp_path / "x.duckdb"))
    assert ran.returncode != 0
    assert "--input_files is required" in ran.stderr + ran.stdout
