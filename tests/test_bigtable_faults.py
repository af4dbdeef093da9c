"""Bigtable outages during a run (issue 3, item 6), against the real emulator.

cbtemulator keeps its tables in memory, so killing and restarting it loses every row
written before: "no gaps" could not be checked, only lost. The outage here is the
process stopped (SIGSTOP, by PID) mid-write and continued (SIGCONT) some seconds later:
its port stays bound and its data stays, but it answers nothing, so every write times
out, as with a server that hangs or a network that drops packets. The sink must resend
with backoff and the table must end complete (no gaps) with one row and one cell version
per window (no doubles). The second test keeps the emulator gone: the sink must give up
within its bound with an error that says what to do.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import oracle
from pipeline.generator import GeneratorConfig, write_dataset
from pipeline.graph import ClickstreamMetrics
from pipeline.job import counters_of
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.test_sink_bigtable import CHANGELOG, raw_cell_count
from transforms import sink_bigtable
from transforms.sources import ReadEventFiles

PROJECT, INSTANCE, TABLE = "test-project", "test-instance", "faults"
OUTAGE_S = 6.0
# Short timeouts so the test sees several retries within a few seconds; production
# defaults are 20 s per attempt, 60 s per call, backoff 1 s doubling to 60 s, 15 min.
FAST = {"attempt_timeout_s": 1.0, "call_budget_s": 2.0, "initial_backoff_s": 0.25,
        "max_backoff_s": 2.0}


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


def test_a_stopped_emulator_mid_run_is_retried_and_the_table_ends_complete(
        emulator, tmp_path) -> None:
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
    # One row per request: hundreds of requests, so the outage lands mid-write.
    _ = changelog | sink_bigtable.WriteChangelogToBigtable(
        PROJECT, INSTANCE, TABLE, flush_count=1, create_table=True,
        give_up_after_s=120.0, **FAST)

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
    print(f"outage {outage['continued'] - outage['stopped']:.1f} s; run {finished - started:.1f}"
          f" s; resends {counters['bigtable_write_retries']}; rows written "
          f"{counters['bigtable_rows_written']}; job ended "
          f"{finished - outage['continued']:.1f} s after the emulator came back")
    # The writes failed during the outage and were resent: the job waited it out.
    assert counters["bigtable_write_retries"] >= 2
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
    # resent request overwrote its cells instead of adding versions; and each
    # revision's +1 row counted as written exactly once, although requests cut by the
    # outage may have landed before they were resent.
    assert len(rows) == len(want)
    columns = len(sink_bigtable.encode_cells(CHANGELOG[0]))
    assert raw_cell_count(TABLE) == columns * sum(r["revision"] for r in rows)
    assert counters["bigtable_rows_written"] == sum(r["revision"] for r in rows)


def test_an_emulator_that_stays_down_fails_the_job_within_the_bound_saying_what_to_do(
        emulator) -> None:
    sink_bigtable.ensure_table(PROJECT, INSTANCE, TABLE)
    servers.stop_process(emulator)  # down for good: the port refuses connections
    give_up_after_s = 4.0
    started = time.monotonic()
    p = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"]))
    _ = (p | beam.Create(CHANGELOG)
         | sink_bigtable.WriteChangelogToBigtable(
             PROJECT, INSTANCE, TABLE, give_up_after_s=give_up_after_s, **FAST))
    with pytest.raises(Exception, match="re-run the same input") as failure:
        p.run().wait_until_finish()
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert f"projects/{PROJECT}/instances/{INSTANCE}/tables/{TABLE}" in message
    assert "attempts over" in message
    # Bounded: gave up after the budget plus at most one call and a little slack, not
    # after the client's own 600 s.
    assert give_up_after_s <= elapsed < give_up_after_s + FAST["call_budget_s"] + 30
