"""Rescale during a burst: the streaming job on a Flink session cluster at parallelism 1
falls behind a 5x burst, the lag alert fires, a savepoint of the running job is taken
and the job cancelled, and it is restarted from the savepoint at parallelism 4
(--parallelism); measured: alert → savepoint → restarted → caught up, and the sink's
counts against every unique event sent.

    python -m benchmarks.rescale [--rate 2400] [--seconds 60] [--out benchmarks/]

Runs itself inside `unshare -n` (the worker pool's SDK harnesses, the expansion service
and Flink's reporter-free cluster stay on a private loopback); results go to
OUT/results-rescale-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.isolated import run_inside_private_network

ROOT = Path(__file__).resolve().parents[1]
TOPIC, GROUP = "events", "clickstream-rescale"
ALERT = "ClickstreamConsumerLagGrowing"


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def inside(out: Path, rate: float, seconds: float, rescaled: int) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from pipeline.kafka import consumer_lag, ensure_topic
    from pipeline.load import Burst, LoadConfig, run_load
    from runners.flink_session import FlinkSession, Settings
    from tests.prometheus import load_rules, prometheus, with_short_waits
    from tests.servers import free_port, kafka_broker, stop_process
    from transforms.sink_duckdb import read_rows

    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.monotonic() - t0, 1)
        logging.info("rescale: %s at %.1f s", name, marks[name])

    db = str(out / "rescale.duckdb")
    port = free_port()
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_broker())
        ensure_topic(bootstrap, TOPIC, partitions=4)
        session = FlinkSession(out / "session")
        session.start(Settings(jm_memory="768m", tm_memory="1024m", taskmanagers=2,
                               slots=2))
        stack.callback(session.stop)
        mark("cluster_up")
        jobs: list[subprocess.Popen] = []

        def start_job(parallelism: int, savepoint: str | None = None) -> None:
            args = session.submit_args(parallelism=parallelism, max_parallelism=128,
                                       checkpointing_interval=2000,
                                       min_pause_between_checkpoints=500)
            log = open(out / f"job-{len(jobs) + 1}.log", "wb")  # noqa: SIM115
            jobs.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "clickstream"), "run", *args,
                 "--kafka_bootstrap", bootstrap, "--kafka_topic", TOPIC,
                 "--kafka_group", GROUP, "--duckdb_path", db, "--metrics_port", str(port),
                 "--metrics_poll_s", "1", "--early_firing_s", "5",
                 *([f"--savepoint_path={savepoint}"] if savepoint else [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

        def stop_jobs() -> None:
            for job in jobs:
                stop_process(job, timeout=120)

        stack.callback(stop_jobs)

        def running_job() -> str | None:
            ids = [j["jid"] for j in session.jobs() if j["state"] == "RUNNING"]
            return ids[0] if ids else None

        def lag() -> int:
            return sum(p.lag for p in consumer_lag(bootstrap, TOPIC, GROUP))

        rules = with_short_waits(load_rules(), for_s=5, windows={"[5m]": "[20s]"})
        prom = stack.enter_context(prometheus([f"127.0.0.1:{port}"], rules=rules))
        start_job(1)
        prom.wait_for("job 1 running", running_job, 300)
        warm = run_load(LoadConfig(bootstrap, TOPIC, rate=100, duration_s=3,
                                   id_prefix="warm"))
        prom.wait_for("job 1 caught up with the warm-up", lambda: lag() == 0 or None, 300)
        mark("job1_running")
        loaded: list[Any] = []
        load = threading.Thread(target=lambda: loaded.append(run_load(LoadConfig(
            bootstrap, TOPIC, rate=rate, duration_s=seconds,
            burst=Burst(5.0, seconds / 2, start_s=5.0), id_prefix="burst"))))
        load.start()
        mark("load_started")
        prom.wait_for(f"{ALERT} firing", lambda: any(
            a["labels"].get("alertname") == ALERT and a["state"] == "firing"
            for a in prom.alerts()), 300)
        mark("alert_firing")
        lag_at_alert = lag()
        jid = running_job()
        # A savepoint taken while the job runs, then the job cancelled: stop-with-savepoint
        # stops Beam's source first, which sends the final watermark ahead of the
        # savepoint barrier, so the savepoint held windows and dedup already flushed
        # and cleared (docs/flink.md, finding 9).
        trigger = post(f"{session.rest_url}/jobs/{jid}/savepoints",
                       {"cancel-job": True,
                        "target-directory": (out / "savepoints").resolve().as_uri()})
        status = prom.wait_for("the savepoint", lambda: (lambda s: s if s["status"]["id"]
                                                          == "COMPLETED" else None)(
            session.rest(f"/jobs/{jid}/savepoints/{trigger['request-id']}")), 300)
        location = status["operation"].get("location")
        if not location:
            raise RuntimeError(f"savepoint failed: {status}")
        mark("savepoint_done")
        # The first run's job has ended with the savepoint; its process (and exporter
        # port) must be gone before the second binds the port.
        with contextlib.suppress(subprocess.TimeoutExpired):
            jobs[0].wait(timeout=60)
        stop_process(jobs[0], timeout=30)
        start_job(rescaled, location)
        prom.wait_for("job 2 running", running_job, 300)
        mark("job2_running")
        load.join()
        mark("load_done")
        prom.wait_for("caught up", lambda: lag() == 0 or None, 900)
        mark("caught_up")
        sent = warm.unique + loaded[0].unique

        def counted() -> int:
            try:
                return int(read_rows(db, "SELECT coalesce(sum(value), 0) FROM metric_latest "
                                         "WHERE metric = 'events' AND granularity = 'day'"
                                     )[0][0])
            except Exception:
                return -1

        with contextlib.suppress(AssertionError):
            prom.wait_for("the sink", lambda: counted() == sent or None, 180)
        mark("sink_checked")
        restored = session.job_checkpoints(running_job() or "")["counts"].get("restored")
        return {"marks_s": marks, "sent": sent, "counted_in_sink": counted(),
                "lag_at_alert": lag_at_alert, "savepoint": location,
                "restored_checkpoints": restored, "parallelism": [1, rescaled],
                "alert_to_caught_up_s": round(marks["caught_up"] - marks["alert_firing"], 1),
                "rate": rate, "burst": "5x", "seconds": seconds,
                "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()}


def markdown(r: dict[str, Any]) -> str:
    m = r["marks_s"]
    return "\n".join([
        "# Rescale during a 5x burst (benchmarks/rescale.py)", "",
        f"{r['cpus']} CPUs · load average at the end "
        f"{', '.join(f'{x:.1f}' for x in r['load_average_at_end'])} · Kafka (4 partitions) "
        f"→ clickstream job on a Flink 1.19 session cluster (2 TaskManagers × 2 slots), "
        f"load {r['rate']:,.0f} events/s for {r['seconds']:.0f} s with a 5x burst", "",
        "| step | seconds from start |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in m.items()], "",
        f"Consumer lag when the alert fired: {r['lag_at_alert']:,}; parallelism "
        f"{r['parallelism'][0]} → {r['parallelism'][1]} through a savepoint; alert → "
        f"caught up {r['alert_to_caught_up_s']:.1f} s; unique events sent {r['sent']:,}, "
        f"counted in the sink {r['counted_in_sink']:,} "
        f"({'exact' if r['sent'] == r['counted_in_sink'] else 'NOT EXACT'}).", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=2400)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--parallelism", type=int, default=4,
                        help="the restored job's parallelism (1: restart from the savepoint "
                             "without rescaling)")
    parser.add_argument("--_inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._inside:
        result = inside(Path(args._inside), args.rate, args.seconds, args.parallelism)
        (Path(args._inside) / "rescale.json").write_text(json.dumps(result, indent=1))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rescale-") as tmp:
        returncode = run_inside_private_network("benchmarks.rescale", [
            "--rate", str(args.rate), "--seconds", str(args.seconds),
            "--parallelism", str(args.parallelism)], tmp)
        if returncode != 0:
            for log in sorted(Path(tmp).glob("job-*.log")):
                print(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:],
                      file=sys.stderr)
            return returncode
        result = json.loads((Path(tmp) / "rescale.json").read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        date = time.strftime("%Y-%m-%d", time.gmtime())
        if result["sent"] != result["counted_in_sink"]:
            # Kept for the diagnosis: the jobs' logs and the sink with its changelog.
            kept = out / f"rescale-{date}-not-exact"
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir()
            for name in ("rescale.duckdb", "job-1.log", "job-2.log"):
                if (Path(tmp) / name).exists():
                    shutil.copy(Path(tmp) / name, kept / name)
            for log in (Path(tmp) / "session").rglob("*.log"):
                shutil.copy(log, kept / f"flink-{log.name}")
            for states in ("savepoints", "session/checkpoints"):
                if (Path(tmp) / states).exists():
                    shutil.copytree(Path(tmp) / states, kept / Path(states).name)
            print(f"not exact: logs and sink kept in {kept}", file=sys.stderr)
    (out / f"results-rescale-{date}.json").write_text(json.dumps(result, indent=1))
    (out / f"results-rescale-{date}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["sent"] == result["counted_in_sink"] else 1


if __name__ == "__main__":
    sys.exit(main())
