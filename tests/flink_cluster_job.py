#!/usr/bin/env python
"""A session cluster loses a TaskManager under the running pipeline; print what happened
as JSON (last line).

Not a pytest module: tests/test_flink_cluster.py runs it in a private network namespace
(only loopback up: Beam's job server and the embedded services bind wide), so the
cluster, the job server and the worker pool all live in that namespace.

    .venv/bin/python tests/flink_cluster_job.py --dir DIR --input_files 'D/events-*.jsonl' \
        --windows N [--checkpoint_ms 2000] [--kill]

Steps: ``runners.flink_session`` starts a JobManager and two TaskManagers (1 slot each)
on 127.0.0.1 plus the project's loopback-only worker pool; the clickstream graph
(``pipeline.job.build``) is submitted as a streaming job with ``--flink_master`` = the
REST address, the EXTERNAL environment (that pool), checkpointing every
``--checkpoint_ms`` into RocksDB. Through Flink's REST API: the job reaches RUNNING and
checkpoints complete. With ``--kill``: once a checkpoint has completed (and before the
sink holds any final window) TaskManager 2 is killed by PID (SIGKILL) and started
again; the job restarts from the last completed checkpoint. Then the job runs until the
DuckDB sink holds ``--windows`` final windows, is cancelled, and the cluster stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from pipeline import job  # noqa: E402
from pipeline.options import ClickstreamOptions  # noqa: E402
from runners.flink_session import FlinkSession, Settings  # noqa: E402
from tests.flink_job import final_windows  # noqa: E402

# An early pane fired by the processing-time clock after the last checkpoint, written,
# then fired again with other contents after the restore would be a revision the keyed
# sink keeps from the first attempt (docs/flink.md, checkpoints).
NO_EARLY_PANES = ("--early_firing_s=0",)


def say(message: str) -> None:
    print(f"flink_cluster_job: {message}", file=sys.stderr, flush=True)


def wait(what: str, check, timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # REST not answering this instant
            value = None
        if value:
            return value
        time.sleep(every_s)
    raise SystemExit(f"flink_cluster_job: timed out after {timeout_s:.0f} s waiting for {what}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--input_files", required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--checkpoint_ms", type=int, default=2000)
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--timeout_s", type=float, default=420)
    args = parser.parse_args(argv)
    run_dir = Path(args.dir)
    db = str(run_dir / "out.duckdb")
    report: dict[str, Any] = {"checkpoint_interval_ms": args.checkpoint_ms}
    session = FlinkSession(run_dir / "session")
    started = time.monotonic()
    result = None
    try:
        report["session_start_s"] = round(session.start(
            Settings(taskmanagers=2, slots=1, jm_memory="768m", tm_memory="1280m")), 1)
        say(f"session up in {report['session_start_s']} s at {session.rest_url}")
        # Bundles are not finished before each checkpoint here: over files one element is
        # a whole file, so with that option the first checkpoint waits for the whole read
        # and the kill could not land mid-run (docs/flink.md, finding 7).
        submit = session.submit_args(
            checkpointing_interval=args.checkpoint_ms, min_pause_between_checkpoints=500,
            parallelism=2, state_backend="rocksdb", finish_bundle_before_checkpointing=False)
        options = PipelineOptions([*submit, f"--input_files={args.input_files}",
                                   f"--duckdb_path={db}", *NO_EARLY_PANES])
        report["submit_args"] = submit
        p = beam.Pipeline(options=options)
        job.build(p, options.view_as(ClickstreamOptions))
        submitted = time.monotonic()
        result = p.run()
        job_id = wait("the job on REST", lambda: [j["jid"] for j in session.jobs()
                                                  if j["state"] == "RUNNING"], 180)[0]
        report["job_id"] = job_id
        report["submit_to_running_s"] = round(time.monotonic() - submitted, 1)
        say(f"job {job_id} RUNNING after {report['submit_to_running_s']} s")
        completed = wait("a completed checkpoint", lambda: session.job_checkpoints(job_id)[
            "counts"]["completed"], 180)
        say(f"{completed} checkpoint(s) completed; sink final windows: {final_windows(db)}")
        if args.kill:
            if final_windows(db) > 0:
                raise SystemExit("flink_cluster_job: the sink already holds final windows "
                                 "before the kill: make the dataset larger")
            last = session.job_checkpoints(job_id)["latest"]["completed"]
            report["last_checkpoint_before_kill"] = last["id"] if last else None
            killed = time.monotonic()
            killed_epoch_ms = time.time() * 1000
            pid = session.pid("taskmanager-2")
            session.kill_taskmanager(2, signal.SIGKILL, wait_s=30)
            report["killed_pid"] = pid
            report["tm_loss_noticed_s"] = round(time.monotonic() - killed, 1)
            say(f"taskmanager-2 (pid {pid}) killed; REST noticed in "
                f"{report['tm_loss_noticed_s']} s; starting it again")
            report["tm_restart_s"] = round(session.start_taskmanager(2, wait_s=60), 1)

            def restored() -> Any:
                info = session.job_checkpoints(job_id)
                state = session.rest(f"/jobs/{job_id}")["state"]
                latest = info["latest"].get("restored")
                return latest if latest and state == "RUNNING" else None

            restore = wait("the job to restore from a checkpoint", restored, 180)
            report["restored_checkpoint"] = restore["id"]
            # What the restart replays: the processing between that checkpoint's barrier
            # and the kill, redone by the new attempt (its sink writes are no-ops). The
            # restored checkpoint may be a later one than the last seen before the kill
            # (one can complete while the kill is being noticed), so ask for its own
            # trigger time.
            restored_details = session.rest(
                f"/jobs/{job_id}/checkpoints/details/{restore['id']}")
            report["replayed_processing_s"] = round(
                (killed_epoch_ms - restored_details["trigger_timestamp"]) / 1000, 1)
            report["recovered_s"] = round(time.monotonic() - killed, 1)
            say(f"job RUNNING again from checkpoint {restore['id']}, "
                f"{report['recovered_s']} s after the kill")
        wait(f"{args.windows} final windows in the sink",
             lambda: final_windows(db) >= args.windows, args.timeout_s, every_s=2)
        report["all_final_s"] = round(time.monotonic() - submitted, 1)
        info = session.job_checkpoints(job_id)
        report["checkpoints"] = {k: info["counts"].get(k) for k in
                                 ("completed", "failed", "restored", "in_progress")}
        report["job_state_before_cancel"] = session.rest(f"/jobs/{job_id}")["state"]
        session.cancel_job(job_id)  # result.cancel() alone leaves the cluster's job up
        result.cancel()
        result = None
        wait("the job to be CANCELED", lambda: session.rest(f"/jobs/{job_id}")["state"]
             == "CANCELED", 60)
        report["job_state"] = "CANCELED"
    finally:
        if result is not None:
            try:
                result.cancel()
            except Exception as exc:
                say(f"cancel failed: {exc}")
        stopped = session.stop()
        report["stopped"] = stopped
        report["still_running"] = session.running()
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
