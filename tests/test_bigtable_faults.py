"""Bigtable outages during a run (issue 3, item 6), against the real emulator.

The sink writes through Beam's WriteToBigTable, so retrying is the Bigtable client's
(transforms/sink_bigtable.py). cbtemulator keeps its tables in memory, so killing and
restarting it loses every row written before: "no gaps" could not be checked, only lost.
The outage here is the process stopped (SIGSTOP, by PID) mid-write and continued
(SIGCONT) some seconds later: its port stays bound and its data stays, but it answers
nothing, as a server that hangs or a network that drops packets. The client's retries
must ride it out and the table must end complete (no gaps) with one row and one cell
version per revision (no doubles). The client's 600 s give-up is too long to wait for
here; the second test is the fast failure instead (a missing table, NOT_FOUND, not
retried): ``clickstream run`` must fail at once, naming the table and saying to re-run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud.bigtable.data._sync_autogen import _mutate_rows
from google.cloud.bigtable.data._sync_autogen import client as data_client

from pipeline import cli, job, oracle
from pipeline.generator import GeneratorConfig, write_dataset
from pipeline.graph import ClickstreamMetrics
from pipeline.job import counters_of
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.test_sink_bigtable import CHANGELOG, raw_cell_count
from transforms import sink_bigtable
from transforms.sources import ReadEventFiles

pytestmark = pytest.mark.integration  # the Bigtable emulator, paused and stopped

PROJECT, INSTANCE, TABLE = "test-project", "test-instance", "faults"
OUTAGE_S = 6.0
# The client bounds each mutate_rows attempt to 60 s: a 6 s pause would only delay the
# attempts in flight, which the emulator answers once continued, and no retry would
# run. 1 s per attempt here makes the pause time attempts out, so the client's retry
# path (backoff, resend) is what rides it out, as it would in a longer outage.
ATTEMPT_TIMEOUT_S = 1.0


@pytest.fixture
def emulator(monkeypatch):
    try:
        cm = servers.bigtable_emulator_process()
        address, proc = cm.__enter__()
    except servers.ServerError as exc:
        pytest.fail(f"{exc} — install the Google Cloud CLI with its emulators", pytrace=False)
    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", address)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # a stopped (SIGSTOP) process cannot act on SIGTERM
            os.kill(proc.pid, signal.SIGCONT)
        cm.__exit__(None, None, None)


def pause_after_first_row(pid: int, outage: dict) -> None:
    """SIGSTOP the emulator once the sink has written a row, SIGCONT it OUTAGE_S later."""
    table = sink_bigtable._table(PROJECT, INSTANCE, TABLE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if any(True for _ in table.read_rows(limit=1)):
                break
        except Exception:  # the table is not created yet
            pass
        time.sleep(0.01)
    else:
        return
    os.kill(pid, signal.SIGSTOP)
    outage["stopped"] = time.monotonic()
    time.sleep(OUTAGE_S)
    os.kill(pid, signal.SIGCONT)
    outage["continued"] = time.monotonic()


@pytest.fixture
def failed_attempts(monkeypatch) -> list[BaseException]:
    """Shorter client attempts (ATTEMPT_TIMEOUT_S), and the error of every mutate_rows
    attempt that failed: each one the client retried, or gave up on (which fails the
    job). Both patch the client in this process, where the DirectRunner's FnApiRunner
    runs the DoFns."""
    monkeypatch.setitem(data_client._DataApiTarget.__init__.__kwdefaults__,
                        "default_mutate_rows_attempt_timeout", ATTEMPT_TIMEOUT_S)
    errors: list[BaseException] = []
    run_attempt = _mutate_rows._MutateRowsOperation._run_attempt

    def counted(self):
        try:
            return run_attempt(self)
        except Exception as exc:
            errors.append(exc)
            raise

    monkeypatch.setattr(_mutate_rows._MutateRowsOperation, "_run_attempt", counted)
    return errors


def beam_rows_written(result) -> int:
    """WriteToBigTable's own counter ('Written Row', rows handed to the batcher)."""
    return sum(c.committed for c in result.metrics().query(
        MetricsFilter().with_name("Written Row"))["counters"])


def test_a_paused_emulator_mid_run_is_ridden_out_by_the_client_retries_without_doubles(
        emulator, failed_attempts, tmp_path) -> None:
    data = tmp_path / "events"
    write_dataset(str(data), GeneratorConfig(events=3000, seed=21))
    with open(data / "expected.json") as f:
        want = oracle.from_json(json.load(f)["metrics"])

    argv = ["--runner=DirectRunner", "--input_files", str(data / "events-*.jsonl")]
    options = PipelineOptions(argv)
    clickstream = options.view_as(ClickstreamOptions)
    p = beam.Pipeline(options=options)
    changelog, _ = (p | ReadEventFiles(clickstream.input_files)
                    | ClickstreamMetrics(clickstream.metrics_config().for_bounded_input()))
    # flush_count counts mutations: 1 sends each row (11 cells) in its own request, so
    # hundreds of requests and the outage lands mid-write.
    _ = changelog | sink_bigtable.WriteChangelogToBigtable(
        PROJECT, INSTANCE, TABLE, flush_count=1, create_table=True)

    outage: dict[str, float] = {}
    watcher = threading.Thread(target=pause_after_first_row, args=(emulator.pid, outage),
                               daemon=True)
    watcher.start()
    started = time.monotonic()
    result = p.run()
    result.wait_until_finish()
    finished = time.monotonic()
    watcher.join(timeout=OUTAGE_S + 5)
    counters = counters_of(result)

    assert "continued" in outage, "the emulator was never paused: nothing was tested"
    timeouts = sum("Deadline" in type(e).__name__ for e in failed_attempts)
    print(f"outage {outage['continued'] - outage['stopped']:.1f} s; run "
          f"{finished - started:.1f} s; failed attempts {len(failed_attempts)} "
          f"({timeouts} deadline exceeded), all retried; rows handed to the write "
          f"{counters['bigtable_rows_to_write']}; job ended "
          f"{finished - outage['continued']:.1f} s after the emulator came back")
    # The attempts failed during the outage and the client retried them until the
    # emulator answered: the job waited the outage out instead of failing.
    assert timeouts >= 1
    assert finished - started > OUTAGE_S
    assert finished > outage["continued"]
    rows = list(sink_bigtable.read_all_rows(PROJECT, INSTANCE, TABLE))
    got = {(r["metric"], r["dims"], r["granularity"], r["window_start"].isoformat()):
           r["value"] for r in rows}
    # No gaps: every window of the oracle, with its exact value; and nothing else.
    assert got == want
    assert all(r["is_final"] for r in rows)
    # No doubles: one row per window; per column one cell version per revision (a
    # window's revisions 1..r; the older ones wait for garbage collection), so a
    # resent request overwrote its cells instead of adding versions, although requests
    # cut by the outage may have landed before they were resent.
    assert len(rows) == len(want)
    columns = len(sink_bigtable.encode_cells(CHANGELOG[0]))
    assert raw_cell_count(TABLE) == columns * sum(r["revision"] for r in rows)
    revisions = sum(r["revision"] for r in rows)
    assert counters["bigtable_rows_to_write"] == beam_rows_written(result) == revisions


def test_a_missing_table_fails_clickstream_run_at_once_naming_it_and_saying_to_rerun(
        emulator, monkeypatch, tmp_path) -> None:
    """NOT_FOUND is not retried: the write fails in its first bundle, and the run ends
    with the sink's advice instead of a bare "Errors in batch mutations."."""
    data = tmp_path / "events"
    write_dataset(str(data), GeneratorConfig(events=300, seed=3))
    # A job that does not create its table (as one without table-admin rights, whose
    # table was never made or was deleted): the run path always asks for creation.
    monkeypatch.setattr(sink_bigtable, "ensure_table", lambda *where: None)
    started = time.monotonic()
    with pytest.raises(job.SinkFailure) as failure:
        cli.main(["run", "--input_files", str(data / "events-*.jsonl"),
                  "--duckdb_path", str(tmp_path / "out.duckdb"),
                  "--bigtable_project", PROJECT, "--bigtable_instance", INSTANCE,
                  "--bigtable_table", "missing"])
    elapsed = time.monotonic() - started
    message = str(failure.value)
    print(f"failed after {elapsed:.1f} s: {message}")
    assert f"projects/{PROJECT}/instances/{INSTANCE}/tables/missing" in message
    assert "NotFound" in message
    assert "BIGTABLE_EMULATOR_HOST" in message
    assert "re-run the same input" in message
    # Printed as the console script's last line, exit status 1 (SystemExit semantics).
    assert isinstance(failure.value, SystemExit)
    assert elapsed < 120  # the whole small run, not the client's 600 s retry deadline
