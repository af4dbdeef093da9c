#!/usr/bin/env python
"""A session cluster loses a TaskManager under the running pipeline while it reads a Kafka
topic; print what happened as JSON (last line).

Not a pytest module: tests/test_flink_cluster.py runs it in a private network namespace
(only loopback up: Beam's job server and the embedded services bind wide), so the
broker, the cluster, the job server and the worker pool all live in that namespace.

    .venv/bin/python tests/flink_cluster_job.py --dir DIR --replay_dir DATA \
        --windows N [--checkpoint_ms 2000] [--kill [--kill_delay_s S]] [job args...]

Steps: a Kafka broker (``scripts/kafka``, a topic of 2 partitions);
``runners.flink_session`` starts a JobManager and two TaskManagers (1 slot each) on
127.0.0.1 plus the project's loopback-only worker pool; ``clickstream run`` submits the
graph as a streaming job on that topic (``--flink_master`` = the REST address, the
EXTERNAL environment = that pool, parallelism 2, RocksDB, a checkpoint every
``--checkpoint_ms``), with the defaults of any streaming Flink run (bundles finished
before each barrier, sinks fed only what a completed checkpoint holds), early and late
panes every second. The replay is published first, each record stamped with its
simulated arrival time: published while the job read, the reader would catch up between
records, and a caught-up Kafka reader moves its watermark to the wall clock, past every
replayed window (docs/streaming.md). With ``--kill``: once a checkpoint has completed,
the sink holds rows and ``--kill_delay_s`` have passed since the latest checkpoint,
TaskManager 2 is killed by PID (SIGKILL) and started again; the job restarts from the
last completed checkpoint and re-reads the topic from that checkpoint's offsets. Then
the job runs until the DuckDB sink holds ``--windows`` final windows (the drained
topic's watermark passes every horizon), is cancelled, and the broker and cluster
stopped. Arguments the harness does not know go to ``clickstream run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from pipeline.kafka import ensure_topic  # noqa: E402
from pipeline.publish import publish_to_kafka  # noqa: E402
from runners.flink_session import FlinkSession, Settings  # noqa: E402
from tests.flink_job import final_windows, sink_rows  # noqa: E402
from tests.servers import kafka_broker, stop_process  # noqa: E402

TOPIC = "clicks"
GROUP = "clickstream-tm-loss"


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
    parser.add_argument("--replay_dir", required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--checkpoint_ms", type=int, default=2000)
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--kill_delay_s", type=float, default=0.0,
                        help="Kill this long after the latest checkpoint completed: what "
                             "the sink received meanwhile is recomputed after the restart.")
    parser.add_argument("--timeout_s", type=float, default=420)
    args, job_args = parser.parse_known_args(argv)
    run_dir = Path(args.dir)
    db = str(run_dir / "out.duckdb")
    report: dict[str, Any] = {"checkpoint_interval_ms": args.checkpoint_ms}
    session = FlinkSession(run_dir / "session")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_broker())
        ensure_topic(bootstrap, TOPIC, partitions=2)
        report["published"] = publish_to_kafka(bootstrap, TOPIC, args.replay_dir,
                                               timestamps="arrival").published
        report["session_start_s"] = round(session.start(
            Settings(taskmanagers=2, slots=1, jm_memory="768m", tm_memory="1280m")), 1)
        stack.callback(lambda: report.update(stopped=session.stop(),
                                             still_running=session.running()))
        say(f"session up in {report['session_start_s']} s at {session.rest_url}")
        submit = session.submit_args(
            checkpointing_interval=args.checkpoint_ms, min_pause_between_checkpoints=500,
            parallelism=2, state_backend="rocksdb")
        report["submit_args"] = submit
        log = stack.enter_context(open(run_dir / "job.log", "wb"))
        submitted = time.monotonic()
        job_proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", *submit,
             "--kafka_bootstrap", bootstrap, "--kafka_topic", TOPIC, "--kafka_group", GROUP,
             "--duckdb_path", db, "--early_firing_s", "1", "--late_firing_s", "1",
             *job_args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stack.callback(stop_process, job_proc, 60)
        job_id = wait("the job on REST", lambda: [j["jid"] for j in session.jobs()
                                                  if j["state"] == "RUNNING"], 240)[0]
        report["job_id"] = job_id
        report["submit_to_running_s"] = round(time.monotonic() - submitted, 1)
        say(f"job {job_id} RUNNING after {report['submit_to_running_s']} s")
        # The kill must land after the sink has rows that a restarted attempt recomputes.
        wait("a completed checkpoint and rows in the sink", lambda: session.job_checkpoints(
            job_id)["counts"]["completed"] and sink_rows(db) > 0, 180)
        if args.kill:

            def late_in_the_interval() -> bool:
                last = session.job_checkpoints(job_id)["latest"]["completed"]
                return bool(last) and (time.time() * 1000 - last["latest_ack_timestamp"]
                                       >= args.kill_delay_s * 1000)

            wait(f"{args.kill_delay_s} s since the latest completed checkpoint",
                 late_in_the_interval, 120, every_s=0.2)
            if final_windows(db) >= args.windows:
                raise SystemExit("flink_cluster_job: every window was final before the "
                                 "kill: use a larger dataset")
            last = session.job_checkpoints(job_id)["latest"]["completed"]
            report["last_checkpoint_before_kill"] = last["id"] if last else None
            report["sink_rows_before_kill"] = sink_rows(db)
            killed = time.monotonic()
            killed_epoch_ms = time.time() * 1000
            pid = session.pid("taskmanager-2")
            session.kill_taskmanager(2, signal.SIGKILL, wait_s=30)
            report["killed_pid"] = pid
            report["tm_loss_noticed_s"] = round(time.monotonic() - killed, 1)
            say(f"taskmanager-2 (pid {pid}) killed with {report['sink_rows_before_kill']} "
                f"sink rows; REST noticed in {report['tm_loss_noticed_s']} s; starting it again")
            report["tm_restart_s"] = round(session.start_taskmanager(2, wait_s=60), 1)

            def restored() -> Any:
                info = session.job_checkpoints(job_id)
                state = session.rest(f"/jobs/{job_id}")["state"]
                latest = info["latest"].get("restored")
                return latest if latest and state == "RUNNING" else None

            restore = wait("the job to restore from a checkpoint", restored, 180)
            report["restored_checkpoint"] = restore["id"]
            # What the restart replays: the processing between that checkpoint's barrier
            # and the kill, redone by the new attempt. The restored checkpoint may be a
            # later one than the last seen before the kill (one can complete while the
            # kill is being noticed), so ask for its own trigger time.
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
        session.cancel_job(job_id)
        wait("the job to be CANCELED", lambda: session.rest(f"/jobs/{job_id}")["state"]
             == "CANCELED", 60)
        report["job_state"] = "CANCELED"
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
