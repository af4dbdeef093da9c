"""Dedup state on RocksDB, measured: bytes each remembered event id costs in the state
backend the streaming job actually runs on.

    python -m benchmarks.state_size [--steps 4] [--step_events 60000] [--rate 3000] [--out DIR]

The streaming job runs on a Flink session cluster (2 TaskManagers × 1 slot, parallelism
2, RocksDB, full checkpoints every 5 s) reading a Kafka topic that the load generator
fills in steps of --step_events unique events stamped now (no duplicates, none late).
With ``--distinct hll`` the windows hold fixed-size sketches, so what grows with the
events is the dedup stage's ids: none is forgotten during the run (ids are kept for the
3-day lateness). After each step, once the consumer group has committed every offset (the
job has read and checkpointed everything) and a checkpoint triggered after that has
completed, it records: the checkpoint's full size and the dedup operator's share of it
(Flink's REST API), and the bytes of the TaskManagers' RocksDB working directories on
local disk (SST files, logs; memtables not yet flushed are not on disk). The slopes over
the steps (least squares) are the bytes per unique event; the fixed part (windows,
sketches, timers, Kafka offsets) is the intercept.

Runs itself inside ``unshare -n`` (the worker pool's SDK harnesses, the expansion service
and the job server stay on a private loopback); results go to
OUT/results-state-size-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.isolated import run_inside_private_network

ROOT = Path(__file__).resolve().parents[1]
TOPIC, GROUP = "events", "clickstream-state-size"
CHECKPOINT_MS = 5000
# The fused stage whose root is the dedup's stateful DoFn: its keyed state is the ids
# (the "Dedup/GroupPerBucket" vertex before it only groups a bundle's ids per bucket).
DEDUP_STAGE = "{Dedup"


def rocksdb_bytes(session_dir: Path) -> int:
    """Bytes of every RocksDB instance's directory under the TaskManagers' local dirs."""
    total = 0
    for db in session_dir.rglob("db"):
        if db.is_dir() and (db / "CURRENT").exists():
            total += sum(f.stat().st_size for f in db.rglob("*") if f.is_file())
    return total


def inside(out: Path, steps: int, step_events: int, rate: float) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from pipeline.kafka import consumer_lag, ensure_topic
    from pipeline.load import LoadConfig, run_load
    from runners.flink_session import FlinkSession, Settings
    from tests.servers import kafka_broker, stop_process

    def wait(what: str, check: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                value = check()
                if value:
                    return value
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_broker())
        ensure_topic(bootstrap, TOPIC, partitions=2)
        session = FlinkSession(out / "session")
        session.start(Settings(jm_memory="768m", tm_memory="1280m", taskmanagers=2, slots=1))
        stack.callback(session.stop)
        args = session.submit_args(parallelism=2, checkpointing_interval=CHECKPOINT_MS,
                                   min_pause_between_checkpoints=1000,
                                   state_backend="rocksdb")
        log = stack.enter_context(open(out / "job.log", "wb"))
        job = subprocess.Popen(
            [str(Path(sys.executable).parent / "clickstream"), "run", *args,
             "--kafka_bootstrap", bootstrap, "--kafka_topic", TOPIC, "--kafka_group", GROUP,
             "--duckdb_path", str(out / "state.duckdb"), "--distinct", "hll"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stack.callback(stop_process, job, 120)
        jid = wait("the job running", lambda: [j["jid"] for j in session.jobs()
                                                if j["state"] == "RUNNING"], 300)[0]
        vertices = {v["id"]: v["name"] for v in session.rest(f"/jobs/{jid}")["vertices"]}
        dedup = [vid for vid, name in vertices.items() if DEDUP_STAGE in name]
        unique = 0
        for step in range(1, steps + 1):
            loaded = run_load(LoadConfig(bootstrap, TOPIC, rate=rate,
                                         duration_s=step_events / rate, id_prefix=f"s{step}",
                                         partitions=2, seed=step))
            unique += loaded.unique
            wait(f"step {step} read and committed", lambda: all(
                p.lag == 0 for p in consumer_lag(bootstrap, TOPIC, GROUP)), 600)
            after_ms = time.time() * 1000

            def newer_checkpoint(after_ms: float = after_ms) -> Any:
                latest = session.job_checkpoints(jid)["latest"]["completed"]
                return latest if latest and latest["trigger_timestamp"] > after_ms else None

            checkpoint = wait("a checkpoint after the step", newer_checkpoint, 120)
            details = session.rest(f"/jobs/{jid}/checkpoints/details/{checkpoint['id']}")
            dedup_bytes = sum(details["tasks"][vid]["state_size"] for vid in dedup)
            by_vertex = {vertices[vid]: task["state_size"]
                         for vid, task in details["tasks"].items() if task["state_size"]}
            row = {"step": step, "unique_events": unique, "checkpoint_id": checkpoint["id"],
                   "checkpoint_bytes": checkpoint["state_size"],
                   "checkpoint_dedup_bytes": dedup_bytes,
                   "rocksdb_local_bytes": rocksdb_bytes(out / "session"),
                   "load_1m": round(os.getloadavg()[0], 2), "by_vertex": by_vertex}
            rows.append(row)
            logging.info("state_size: %s", row)
    return {"rows": rows, "steps": steps, "step_events": step_events, "rate": rate,
            "checkpoint_interval_ms": CHECKPOINT_MS, "parallelism": 2,
            "cpus": os.cpu_count()}


def fit(result: dict[str, Any]) -> dict[str, Any]:
    xs = [r["unique_events"] for r in result["rows"]]
    fits = {}
    for column in ("checkpoint_bytes", "checkpoint_dedup_bytes", "rocksdb_local_bytes"):
        b, a = statistics.linear_regression(xs, [r[column] for r in result["rows"]])
        fits[column] = {"bytes_per_unique_event": round(b, 1), "fixed_bytes": round(a)}
    return fits


def markdown(r: dict[str, Any]) -> str:
    f = r["fit"]
    lines = [
        "# Dedup state on RocksDB (benchmarks/state_size.py)", "",
        f"{r['date']} · {r['cpus']} CPUs · Kafka (2 partitions) → clickstream job "
        f"(`--distinct hll`) on a Flink 1.19 session cluster, parallelism "
        f"{r['parallelism']}, RocksDB, full checkpoints every "
        f"{r['checkpoint_interval_ms'] / 1000:.0f} s; {r['steps']} steps of "
        f"{r['step_events']:,} unique events at {r['rate']:,.0f}/s; every id kept (3-day "
        "lateness).", "",
        "| step | unique events | checkpoint bytes | dedup operator bytes | RocksDB on local "
        "disk, bytes | load 1m |", "|---:|---:|---:|---:|---:|---:|",
        *[f"| {x['step']} | {x['unique_events']:,} | {x['checkpoint_bytes']:,} | "
          f"{x['checkpoint_dedup_bytes']:,} | {x['rocksdb_local_bytes']:,} | {x['load_1m']} |"
          for x in r["rows"]], "",
        "| measure | bytes per unique event (slope) | fixed bytes (intercept) |",
        "|---|---:|---:|",
        *[f"| {name} | {v['bytes_per_unique_event']:,} | {v['fixed_bytes']:,} |"
          for name, v in f.items()], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step_events", type=int, default=60_000)
    parser.add_argument("--rate", type=float, default=3000)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--_inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._inside:
        result = inside(Path(args._inside), args.steps, args.step_events, args.rate)
        (Path(args._inside) / "state_size.json").write_text(json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="state-size-") as tmp:
        returncode = run_inside_private_network("benchmarks.state_size", [
            "--steps", str(args.steps), "--step_events", str(args.step_events),
            "--rate", str(args.rate)], tmp)
        if returncode != 0:
            log = Path(tmp) / "job.log"
            if log.exists():
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return returncode
        result = json.loads((Path(tmp) / "state_size.json").read_text())
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    result["fit"] = fit(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-state-size-{result['date']}.json").write_text(json.dumps(result, indent=1))
    (out / f"results-state-size-{result['date']}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
