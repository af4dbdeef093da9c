#!/usr/bin/env python
"""Run the clickstream job on FlinkRunner and print its summary as JSON (last line).

Not a pytest module: tests/test_flink_runner.py and tests/test_flink_cluster.py run it
in a child process inside a private network namespace (only loopback up), because
Beam's LOOPBACK worker listens on "[::]:port" and the embedded Flink of the job server
on every interface.

    .venv/bin/python tests/flink_job.py batch --input_files 'DIR/events-*.jsonl' \
        --duckdb_path DIR/out.duckdb [more job args]
    .venv/bin/python tests/flink_job.py streaming --done_windows N ...  # files, streaming
    .venv/bin/python tests/flink_job.py replay --replay_dir DIR --duckdb_path ...

``batch`` is ``pipeline.job.run`` (what `clickstream run` does). ``streaming`` builds
the same graph (``pipeline.job.build``) as a Flink *streaming* job over the files: with
checkpointing such a job never ends by itself (its sources stay up for the next
checkpoint), so it runs until the sink holds ``--done_windows`` final windows, then is
cancelled. ``replay`` is ``pipeline.replay.run_replay`` (TestStream). Every argument
after the mode goes to the job after ``runners.preset_args('flink', ...)``; the JSON has
the counters, the sink tally, the state and the wall time.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # noqa: E402

from pipeline import job  # noqa: E402
from pipeline.options import ClickstreamOptions  # noqa: E402
from runners import preset_args  # noqa: E402
from runners.flink import job_server_tmpdir, use_job_server_tmpdir  # noqa: E402

# Bounded [local] runs need no checkpoints or RocksDB; the streaming mode sets its own.
NO_CHECKPOINTS: dict[str, object] = {
    "checkpointing_interval": None, "min_pause_between_checkpoints": None,
    "state_backend": None, "state_backend_storage_path": None,
    "externalized_checkpoints_enabled": None,
    "retain_externalized_checkpoints_on_cancellation": None,
}



def _sink_count(duckdb_path: str, sql: str) -> int:
    """A count from the sink; -1 while it cannot be read. Opened read-write under the
    sink's process lock: DuckDB refuses a read-only connection in a process that also
    writes the file (LOOPBACK: the SDK worker is this process)."""
    from transforms import sink_duckdb

    try:
        with sink_duckdb._PROCESS_LOCK:
            con = sink_duckdb.connect(duckdb_path)
            try:
                return int(con.execute(sql).fetchall()[0][0])
            finally:
                con.close()
    except Exception:  # not created yet, or another writer holds the lock too long
        return -1


def final_windows(duckdb_path: str) -> int:
    """Final windows in the sink; -1 while it cannot be read."""
    return _sink_count(duckdb_path, "SELECT count(*) FROM metric_latest WHERE is_final")


# A streaming job over files that has written nothing this long after submission has
# stalled (docs/flink.md, finding 6); a healthy one writes its first rows within ~10 s.
STALL_S = 90


def sink_rows(duckdb_path: str) -> int:
    """Changelog and dead-letter rows in the sink; -1 while it cannot be read."""
    return _sink_count(duckdb_path, "SELECT (SELECT count(*) FROM metric_changelog) "
                                    "+ (SELECT count(*) FROM dead_letter)")


def run_streaming_over_files(argv: list[str], done_windows: int, timeout_s: float
                             ) -> tuple[job.RunSummary, int]:
    """The bounded graph as a Flink streaming job; cancelled once every window is final
    in the sink (the test knows how many from the oracle). A job that stalls before
    writing anything is cancelled and submitted once more; returns the summary and the
    number of stalled attempts."""
    options = PipelineOptions(argv)
    options.view_as(StandardOptions).streaming = True
    use_job_server_tmpdir(options)
    clickstream = options.view_as(ClickstreamOptions)
    started = time.monotonic()
    for attempt in range(2):
        p = beam.Pipeline(options=options)
        job.build(p, clickstream)
        submitted = time.monotonic()
        result = p.run()
        deadline = submitted + timeout_s
        seen, stalled = -1, False
        while time.monotonic() < deadline:
            seen = final_windows(clickstream.duckdb_path)
            if seen >= done_windows:
                break
            state = str(result.state)
            if state in ("DONE", "FAILED", "CANCELLED"):
                break
            if (attempt == 0 and time.monotonic() - submitted > STALL_S
                    and sink_rows(clickstream.duckdb_path) == 0):
                stalled = True
                break
            time.sleep(2)
        if stalled:
            print(f"flink_job: nothing in the sink {STALL_S} s after submission (the stall "
                  "of docs/flink.md, finding 6); cancelling and submitting again",
                  file=sys.stderr, flush=True)
            result.cancel()
            continue
        print(f"flink_job: {seen} of {done_windows} windows final after "
              f"{time.monotonic() - started:.0f} s; cancelling", file=sys.stderr, flush=True)
        state = str(result.state)
        if state not in ("DONE", "FAILED", "CANCELLED"):
            result.cancel()
            state = "CANCELLED"
        return (job.summarize(result, time.monotonic() - started, state, clickstream),
                attempt)
    raise AssertionError("unreachable: the second attempt never counts as stalled")


def main(argv: list[str]) -> int:
    # Beam logs the job server's (Flink's) output at INFO: the parent shows the tail.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    mode, rest = argv[0], argv[1:]
    started = time.monotonic()
    stalled_attempts = 0
    if mode == "batch":
        summary = job.run(preset_args("flink", **NO_CHECKPOINTS) + rest, progress_every_s=30)
    elif mode == "replay":
        from pipeline.replay import run_replay

        summary = run_replay(preset_args("flink", **NO_CHECKPOINTS, streaming=True) + rest)
    elif mode == "streaming":
        done = int(next(a for a in rest if a.startswith("--done_windows=")).split("=")[1])
        rest = [a for a in rest if not a.startswith("--done_windows=")]
        summary, stalled_attempts = run_streaming_over_files(
            [*preset_args("flink"), *rest], done, 420)
    else:
        raise SystemExit(f"unknown mode {mode!r}: batch, streaming or replay")
    print(json.dumps({
        "stalled_attempts": stalled_attempts,
        "counters": summary.counters,
        "counters_available": summary.counters_available,
        "sink": None if summary.sink is None else {
            "counted": summary.sink.counted,
            "dead_letter_by_reason": summary.sink.dead_letter_by_reason},
        "rendered": summary.render(),
        "state": summary.state,
        "elapsed_s": round(summary.elapsed_s, 2),
        "wall_s": round(time.monotonic() - started, 2),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        # Where the job server's embedded Flink kept its working files, and how many
        # clusters left one there; the directory goes when this process exits.
        "job_server_tmpdir": str(job_server_tmpdir()),
        "minicluster_dirs": len(list(job_server_tmpdir().glob("minicluster_*"))),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
