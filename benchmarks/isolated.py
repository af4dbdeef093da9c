"""Benchmarks whose servers must stay on a private loopback (Beam's worker pool and
expansion service, the job server, Flink, Kafka) re-run themselves inside ``unshare -n``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_inside_private_network(module: str, args: Sequence[str], work_dir: str) -> int:
    """Fetch the broker's jars first (the namespace has no route out), then run
    ``python -m MODULE ARGS --_inside WORK_DIR`` in a new network namespace; its exit code."""
    subprocess.run([str(ROOT / "scripts" / "kafka"), "prepare"], check=True)
    return subprocess.run(["unshare", "-n", sys.executable, "-m", module, *args,
                           "--_inside", work_dir], cwd=ROOT).returncode
