"""The end-to-end oracle test, on Prism: generate → run the bounded job on the
PrismRunner → the DuckDB file equals the oracle, the counters reconcile.

The Prism binary comes from scripts/fetch_prism (built once into .cache/bin; nothing
else is downloaded). The job runs in a child process (tests/prism_job.py) inside a
private network namespace with only loopback up: Prism's job service binds ":port" on
every interface and Beam's LOOPBACK worker pool "[::]:port", and neither can be told
to bind 127.0.0.1. Root uses ``unshare --net``; other users ``unshare --user
--map-root-user --net`` where user namespaces are allowed. Without either the tests
fail, unless PRISM_NETNS=0 says to run with the ports open.

    scripts/test_prism                        # or: .venv/bin/python -m pytest -m prism
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import oracle
from pipeline.compare import (
    changelog_mismatches,
    differences,
    latest_from_duckdb,
    windows_not_final,
)
from pipeline.generator import GeneratorConfig, write_dataset
from transforms.sink_duckdb import connect, create_tables, read_rows

pytestmark = [pytest.mark.prism, pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "prism_job.py"
EVENTS = 5_000
SEED = 3
JOB_TIMEOUT_S = 600
# Runs "$0" "$@" after bringing loopback up in the new namespace (no quoting needed).
_LO_UP_AND_EXEC = 'ip link set lo up && exec "$0" "$@"'


def isolation_prefix() -> list[str] | None:
    """Command prefix that runs a command in a fresh network namespace with only
    loopback up; [] when PRISM_NETNS=0 opts out; None when no namespace can be had."""
    if os.environ.get("PRISM_NETNS") == "0":
        return []
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    candidates = [["--net"]] if os.geteuid() == 0 else []
    candidates.append(["--user", "--map-root-user", "--net"])
    for flags in candidates:
        probe = subprocess.run(["unshare", *flags, "sh", "-c", "ip link set lo up"],
                               capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", _LO_UP_AND_EXEC]
    return None


def _unavailable(reason: str) -> None:
    """A missing Prism or network namespace is a failure, never a skip: scripts/test
    builds Prism (scripts/fetch_prism) and the project's machines have unshare."""
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="module")
def prism_binary() -> str:
    """Path of the Prism binary: scripts/fetch_prism reuses the cached build."""
    try:
        proc = subprocess.run([str(ROOT / "scripts" / "fetch_prism")], cwd=ROOT,
                              capture_output=True, text=True, timeout=1200, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/fetch_prism did not run: {exc}")
    if proc.returncode != 0:
        _unavailable(f"scripts/fetch_prism failed: {proc.stderr.strip()[-500:]}")
    path = proc.stdout.strip().splitlines()[-1]
    assert Path(path).is_file(), path
    return path


@pytest.fixture(scope="module")
def netns_prefix() -> list[str]:
    prefix = isolation_prefix()
    if prefix is None:
        _unavailable("no private network namespace (unshare/ip missing or not "
                     "permitted); Prism would listen on every interface. "
                     "PRISM_NETNS=0 runs it anyway.")
    return prefix  # type: ignore[return-value]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prism_generated"))
    write_dataset(out, GeneratorConfig(events=EVENTS, seed=SEED))
    return out


def expected(dataset: str) -> dict:
    with open(os.path.join(dataset, "expected.json")) as f:
        return json.load(f)


def run_isolated(cmd: list[str], env: dict[str, str], timeout_s: float
                 ) -> subprocess.CompletedProcess:
    """Runs cmd in its own process group; on timeout kills that group (the child's
    Prism subprocess included) instead of leaving it behind."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"Prism job timed out after {timeout_s} s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def prism_run(prism_binary: str, netns_prefix: list[str], dataset: str,
              tmp_path_factory) -> tuple[dict[str, Any], str]:
    db = str(tmp_path_factory.mktemp("prism_out") / "out.duckdb")
    # The two sink DoFns create the tables in setup() concurrently in one process; DuckDB
    # then raises "Catalog write-write conflict on create" now and then (seen on the
    # DirectRunner too). Creating them first keeps this test about Prism.
    con = connect(db)
    try:
        create_tables(con)
    finally:
        con.close()
    env = dict(os.environ, PRISM_LOCATION=prism_binary)
    cmd = [*netns_prefix, sys.executable, str(CHILD),
           f"--input_files={os.path.join(dataset, 'events-*.jsonl')}",
           f"--duckdb_path={db}"]
    proc = run_isolated(cmd, env, JOB_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"Prism job failed (exit {proc.returncode}); stderr tail:\n"
                    f"{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nPrism job: {summary['state']}, job {summary['elapsed_s']} s, "
          f"child wall {summary['wall_s']} s, {EVENTS} events")
    return summary, db


def test_prism_job_ran_on_loopback_only(prism_run, netns_prefix: list[str]) -> None:
    summary, _ = prism_run
    assert summary["state"] == "DONE"
    if netns_prefix:
        assert summary["interfaces"] == ["lo"]


def test_prism_counters_reconcile_with_the_generator(dataset: str, prism_run) -> None:
    """read and dead-letter counters come from Prism; unique events are counted from the
    sink (day windows), because Prism 2.77 under-reported the dedup step's counters in
    2 of ~12 runs here (not yet root-caused); the generator's duplicates are then
    read - unique - dead by definition, so they are not asserted again."""
    summary, db = prism_run
    c, counts = summary["counters"], expected(dataset)["counts"]
    (unique,), = read_rows(db, "SELECT sum(value) FROM metric_latest "
                               "WHERE metric = 'events' AND granularity = 'day'")
    assert c["read"] == counts["read"]
    assert c["dead_letter"] == counts["dead_letter"]
    assert unique == counts["unique"]
    by_reason = {k.split(".", 1)[1]: v for k, v in c.items() if k.startswith("dead_letter.")}
    assert by_reason == counts["dead_letter_by_reason"]


def test_prism_dead_letter_table_matches_the_generator(dataset: str, prism_run) -> None:
    _, db = prism_run
    rows = read_rows(db, "SELECT reason, count(*) FROM dead_letter GROUP BY reason")
    assert dict(rows) == expected(dataset)["counts"]["dead_letter_by_reason"]


def test_prism_latest_metrics_equal_the_oracle(dataset: str, prism_run) -> None:
    _, db = prism_run
    want = oracle.from_json(expected(dataset)["metrics"])
    assert len(want) > 100
    (changelog_rows,), = read_rows(db, "SELECT count(*) FROM metric_changelog")
    assert changelog_rows > 0, (
        "Prism wrote no changelog at all: it dropped every event as late data after the "
        "dedup GroupByKey (bounded runs group in the default global window, whose output "
        "timestamp is the end of time; re-stamping events to their event time afterwards "
        "puts them behind the watermark). See the OUTPUT_AT_EARLIEST fix for "
        "transforms/dedup.py.")
    assert differences(latest_from_duckdb(db), want) == []


def test_prism_changelog_sums_to_latest_and_every_window_is_final(prism_run) -> None:
    _, db = prism_run
    (latest_rows,), = read_rows(db, "SELECT count(*) FROM metric_latest")
    assert latest_rows > 0
    assert changelog_mismatches(db) == []
    assert windows_not_final(db) == 0
