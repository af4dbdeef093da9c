"""Hot key before and after: the streaming job on Kafka + FlinkRunner under the same surge
without a hot key, with one bot device at 30% of the traffic (one partition), and with
that bot and the bot policy on. Per run: the largest consumer lag overall and per
partition, time from the lag alert to caught up, the hot-key log lines of the job, and
the counts (every unique event counted or set apart as suspected automation).

    python -m benchmarks.hot_key [--rate 3000] [--seconds 20] [--out benchmarks/]

Each run is tests/lag_alert_probe.py inside `unshare -n` (a broker, the job with its
exporter, Prometheus with monitoring/alerts.yml, the load generator); the three run one
after another in one invocation, so they share the machine's load of the moment (the
load average is recorded). Results: OUT/results-hot-key-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOT_POLICY = ("--job_arg=--bot_max_events=600", "--job_arg=--bot_window_s=60")
RUNS = {
    "no hot key": (0.0, ()),
    "hot key 30%": (0.3, ()),
    "hot key 30% + bot policy": (0.3, BOT_POLICY),
}


def run(name: str, share: float, extra: tuple[str, ...], rate: float, seconds: float
        ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hot-key-") as tmp:
        # Checkpoints to files: the bot policy's per-device groups held ~10 MB of state,
        # over the 5 MB of Flink's default in-memory checkpoint storage (checkpoints
        # failed and the job restarted, measured).
        checkpoints = Path(tmp, "checkpoints").as_uri()
        cmd = ["unshare", "-n", sys.executable, "-m", "tests.lag_alert_probe", tmp,
               "--rate", str(rate), "--seconds", str(seconds),
               "--hot_key_share", str(share), "--warmup", "--job_arg=--state_backend=filesystem",
               f"--job_arg=--state_backend_storage_path={checkpoints}", *extra]
        print(f"[hot_key] {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return {"run": name, "failed": done.stderr[-3000:]}
        result = json.loads((Path(tmp) / "lag_alert.json").read_text())
        return {"run": name, **result}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Hot key before and after (benchmarks/hot_key.py)", "",
             f"{report['measured_at']} · {report['cpus']} CPUs · load average before "
             f"{', '.join(f'{x:.1f}' for x in report['load_average_before'])} · Kafka "
             f"(4 partitions) → clickstream job on FlinkRunner [local], parallelism 2, "
             f"checkpoints every 2 s · load {report['rate']:,.0f} events/s for "
             f"{report['seconds']:.0f} s", "",
             "| run | max consumer lag | max lag per partition | alert → caught up s | "
             "load end → caught up s | sent | counted | suspected automation |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        if "failed" in r:
            lines.append(f"| {r['run']} | failed | | | | | | |")
            continue
        t = r["events_s"]
        parts = ", ".join(f"p{p}: {v:,.0f}" for p, v in r["partition_max_lag"].items())
        lines.append(f"| {r['run']} | {r['max_consumer_lag']:,.0f} | {parts} | "
                     f"{r['alert_to_caught_up_s']:.1f} | "
                     f"{t['caught_up'] - t['load_done']:.1f} | {r['unique_sent']:,} | "
                     f"{r['counted_in_sink']:,} | {r['suspected_automation']:,} |")
    lines += ["", "Hot-key log lines (the job's DetectHotKeys):", ""]
    for r in report["runs"]:
        for line in r.get("hot_key_log", [])[:2]:
            lines.append(f"- {r['run']}: `{line.split(' INFO ')[-1][:200]}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=3000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--only", choices=list(RUNS), action="append",
                        help="re-run these and keep the other runs of today's results file")
    args = parser.parse_args()
    subprocess.run([str(ROOT / "scripts" / "kafka"), "prepare"], check=True)
    report: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
        "rate": args.rate, "seconds": args.seconds, "runs": []}
    out = Path(args.out)
    date = report["measured_at"][:10]
    kept: dict[str, Any] = {}
    if args.only:
        earlier = json.loads((out / f"results-hot-key-{date}.json").read_text())
        kept = {r["run"]: r for r in earlier["runs"] if r["run"] not in args.only}
        report["rerun"] = args.only
    for name, (share, extra) in RUNS.items():
        report["runs"].append(kept.get(name) or run(name, share, extra, args.rate,
                                                     args.seconds))
    report["load_average_after"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-hot-key-{date}.json").write_text(json.dumps(report, indent=1))
    (out / f"results-hot-key-{date}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("failed" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
