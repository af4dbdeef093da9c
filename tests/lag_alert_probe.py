"""The lag alert end to end, run inside a private network namespace (`unshare -n`, as
tests/test_alerts_e2e.py does: Beam's LOOPBACK worker and the expansion service bind every
interface). A Kafka broker, the real clickstream job on FlinkRunner reading it with the
exporter on, a real Prometheus with monitoring/alerts.yml, and the load generator
outrunning the job: the consumer-lag alert must fire, then resolve once the job has
caught up, and the sink must hold every unique event sent. Prints one JSON line.

    python -m tests.lag_alert_probe OUT_DIR [--rate 4000] [--seconds 12]
        [--hot_key_share 0.3] [--job_arg=--bot_max_events=600]

Writes OUT_DIR/lag_alert.json: when each step happened (seconds from the start), the
largest consumer lag Prometheus saw, the time from the alert firing to lag 0, the events
sent and counted, the load average and CPU count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ALERT = "ClickstreamConsumerLagGrowing"
TOPIC = "events"
GROUP = "clickstream-e2e"


def firing(prom: Any) -> bool:
    return any(a["labels"].get("alertname") == ALERT and a["state"] == "firing"
               for a in prom.alerts())


def main(out_dir: str, rate: float, seconds: float, hot_key_share: float = 0.0,
         job_args: Sequence[str] = (), warmup: bool = False) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipeline.kafka import consumer_lag, ensure_topic
    from pipeline.load import LoadConfig, run_load
    from runners.flink import job_server_jar_path
    from tests.prometheus import load_rules, prometheus, with_short_waits
    from tests.servers import free_port, kafka_broker, stop_process
    from transforms.sink_duckdb import read_rows

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = str(out / "e2e.duckdb")
    events: dict[str, Any] = {}
    started = time.monotonic()

    def mark(name: str) -> None:
        events[name] = round(time.monotonic() - started, 1)

    # The rule file as it is, its waits shortened for a test that cannot wait minutes:
    # `for: 10m` → 5 s, the 5-minute derivative window → 20 s.
    rules = with_short_waits(load_rules(), for_s=5, windows={"[5m]": "[20s]"})
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_broker())
        ensure_topic(bootstrap, TOPIC, partitions=4)
        mark("broker_up")
        port = free_port()
        argv = ["--kafka_bootstrap", bootstrap, "--kafka_topic", TOPIC, "--kafka_group", GROUP,
                "--flink_master=[local]", "--environment_type=LOOPBACK", "--parallelism=2",
                f"--flink_job_server_jar={job_server_jar_path()}",
                "--checkpointing_interval=2000", "--duckdb_path", db,
                "--metrics_port", str(port), "--metrics_poll_s", "1", "--early_firing_s", "5",
                *job_args]
        # The real command line, in its own process (Beam starts the job server from the
        # main thread only); SIGTERM is its normal stop.
        job_log = open(out / "job.log", "wb")  # noqa: SIM115 - the child's output
        job = subprocess.Popen([str(Path(sys.executable).parent / "clickstream"), "run",
                                *argv], stdout=job_log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)

        def alive() -> None:
            if job.poll() is not None:
                tail = (out / "job.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the job exited with {job.returncode}:\n{tail}")

        def stop_job() -> None:
            stop_process(job, timeout=180)  # SIGTERM: the job cancels and summarizes
            job_log.close()

        stack.callback(stop_job)
        with prometheus([f"127.0.0.1:{port}"], rules=rules) as prom:
            prom.wait_for("the exporter's lag series", lambda: (alive(), prom.query(
                "clickstream_kafka_consumer_lag"))[1], 240)
            mark("exporter_up")
            warm_unique = 0
            if warmup:  # the job reading and committing before the surge (benchmarks)
                warm_unique = run_load(LoadConfig(bootstrap, TOPIC, rate=200, duration_s=3,
                                                  id_prefix="warm")).unique
                prom.wait_for("the warm-up read", lambda: alive() or sum(
                    p.lag for p in consumer_lag(bootstrap, TOPIC, GROUP)) == 0 or None, 300)
                mark("warm_caught_up")
            loaded: list[Any] = []
            load = threading.Thread(target=lambda: loaded.append(run_load(LoadConfig(
                bootstrap, TOPIC, rate=rate, duration_s=seconds, id_prefix="surge",
                hot_key_share=hot_key_share))))
            load.start()
            mark("load_started")
            max_lag = 0.0
            partition_max: dict[str, float] = {}

            def lag_sum() -> float:
                nonlocal max_lag
                lag = sum(prom.query("clickstream:consumer_lag:sum").values() or [0.0])
                max_lag = max(max_lag, lag)
                for labels, value in prom.query("clickstream_kafka_consumer_lag").items():
                    partition = dict(labels)["partition"]
                    partition_max[partition] = max(partition_max.get(partition, 0), value)
                return lag

            prom.wait_for(f"{ALERT} firing", lambda: (lag_sum(), firing(prom))[1], 240)
            mark("alert_firing")
            load.join()
            mark("load_done")
            prom.wait_for(f"{ALERT} resolved", lambda: (lag_sum(), not firing(prom))[1], 600)
            mark("alert_resolved")
            prom.wait_for("caught up (consumer lag 0)", lambda: sum(
                p.lag for p in consumer_lag(bootstrap, TOPIC, GROUP)) == 0 or None, 600)
            mark("caught_up")
            # The panes of the last events fire on the early trigger: wait for the sink.
            sent = loaded[0].unique + warm_unique

            def counted() -> int:
                try:
                    return int(read_rows(db, "SELECT coalesce(sum(value), 0) FROM "
                                             "metric_latest WHERE metric = 'events' AND "
                                             "granularity = 'day'")[0][0])
                except Exception:
                    return -1

            def suspected() -> int:
                try:
                    return int(read_rows(db, "SELECT count(*) FROM dead_letter WHERE "
                                             "reason = 'suspected_automation'")[0][0])
                except Exception:
                    return -1

            with contextlib.suppress(AssertionError):
                prom.wait_for("every unique event in the sink",
                              lambda: counted() + max(suspected(), 0) == sent or None, 120)
            mark("sink_checked")
        stack.close()  # the job first, then the broker
    result = {"events_s": events, "max_consumer_lag": max_lag,
              "alert_to_caught_up_s": round(events["caught_up"] - events["alert_firing"], 1),
              "sent": loaded[0].sent, "unique_sent": sent, "counted_in_sink": counted(),
              "rate": rate, "seconds": seconds, "load_elapsed_s": loaded[0].elapsed_s,
              "suspected_automation": suspected(), "hot_key_share": hot_key_share,
              "hot_sent": loaded[0].hot, "job_args": list(job_args),
              "partition_max_lag": dict(sorted(partition_max.items())),
              "hot_key_log": [line for line in (out / "job.log").read_text(
                  errors="replace").splitlines() if "hot keys by" in line][:3],
              "job_exit": job.returncode, "cpus": os.cpu_count(),
              "load_average_at_end": os.getloadavg()}
    (out / "lag_alert.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--rate", type=float, default=4000.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--hot_key_share", type=float, default=0.0)
    parser.add_argument("--warmup", action="store_true",
                        help="a trickle first, until the job has committed offsets")
    parser.add_argument("--job_arg", action="append", default=[],
                        help="an extra `clickstream run` flag, e.g. --job_arg=--bot_max_events=600")
    args = parser.parse_args()
    main(args.out_dir, args.rate, args.seconds, args.hot_key_share, args.job_arg,
         args.warmup)
