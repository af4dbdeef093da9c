"""Capacity inputs, measured here: per-stage CPU cost per event, dedup state bytes per id,
the error of cheaper dedup options, and changelog rows per window key.

    python -m benchmarks.capacity [--events 200000] [--repeats 3] [--with-bot-policy] [--out DIR]

Stage costs: the graph is built cumulatively (read; + parse; + dedup; + metrics;
+ retract; + DuckDB sink; + hot-key sketch; + bot policy), each prefix run in its own
process on the DirectRunner's FnApiRunner (batch, one worker, in memory) over the same
generated dataset; a stage's cost is the CPU seconds its prefix adds, per event read, so
the fixed cost of each run (imports, pipeline construction) cancels. Each prefix runs
--repeats times and the median counts. Results: OUT/results-capacity-<date>.json and .md,
with the load average and CPU count (the machine is shared). docs/capacity.md turns
them into the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("read", "parse", "dedup", "metrics", "retract", "sink_duckdb", "hot_keys",
          "bot_policy")


# --- one prefix of the graph, in a child process ----------------------------------------

def build_prefix(p: Any, data_dir: str, duckdb_path: str, upto: int) -> None:
    import apache_beam as beam

    from transforms.dedup import DEFAULT_BUCKETS, DeduplicateEvents
    from transforms.hot_keys import BotPolicy, DetectHotKeys, HotKeyConfig
    from transforms.metrics import ComputeMetrics, MetricsConfig
    from transforms.parse import ParseEvents
    from transforms.retract import RetractingChangelog
    from transforms.sink_duckdb import WriteToDuckDB
    from transforms.sources import ReadEventFiles

    config = MetricsConfig().for_bounded_input()
    stages = STAGES[:upto + 1]
    payloads = p | "ReadFiles" >> ReadEventFiles(os.path.join(data_dir, "events-*.jsonl"))
    if stages == ("read",):
        payloads | "Drop" >> beam.Map(len)
        return
    events, dead_letters = payloads | "Parse" >> ParseEvents()
    last = events
    if "dedup" in stages:
        last = unique = (events | "Dedup" >> DeduplicateEvents(
            config.allowed_lateness_s, DEFAULT_BUCKETS, bounded=True)).unique
    if "hot_keys" in stages:
        unique | "HotKeys" >> DetectHotKeys(HotKeyConfig())
    if "bot_policy" in stages:
        unique, _ = unique | "BotPolicy" >> BotPolicy(1000, 60, config.allowed_lateness_s,
                                                      time.time)
    if "metrics" in stages:
        last = unique | "Metrics" >> ComputeMetrics(config, ("hour", "day"))
    if "retract" in stages:
        last = last | "Retract" >> RetractingChangelog(config.allowed_lateness_s,
                                                       bounded=True)
    if "sink_duckdb" in stages:
        (last, dead_letters) | "Sink" >> WriteToDuckDB(duckdb_path)
        return
    last | "Drop" >> beam.Map(lambda _: None)


def measure_prefix(data_dir: str, upto: int, result_path: str) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.job import counters_of

    with tempfile.TemporaryDirectory() as tmp:
        duckdb_path = os.path.join(tmp, "out.duckdb")
        options = PipelineOptions(["--direct_num_workers=1",
                                   "--direct_running_mode=in_memory"])
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        p = beam.Pipeline(runner="FnApiRunner", options=options)
        build_prefix(p, data_dir, duckdb_path, upto)
        result = p.run()
        result.wait_until_finish()
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        keys = {}
        if STAGES[upto] == "sink_duckdb":
            keys = window_keys(duckdb_path)
        Path(result_path).write_text(json.dumps({
            "stage": STAGES[upto], "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_mib": after.ru_maxrss / 1024, "counters": counters_of(result),
            "window_keys": keys}))


def window_keys(duckdb_path: str) -> dict[str, Any]:
    """Keys (metric, dims) per hour and per day window in the sink: what an early pane
    firing re-emits at most (a revision and a retraction per key that changed)."""
    from transforms.sink_duckdb import read_rows

    rows = read_rows(duckdb_path, """
        SELECT granularity, window_start, count(*) FROM metric_latest
        GROUP BY granularity, window_start""")
    per: dict[str, list[int]] = defaultdict(list)
    for granularity, _, n in rows:
        per[granularity].append(n)
    return {g: {"windows": len(v), "max_keys": max(v), "mean_keys": statistics.mean(v)}
            for g, v in per.items()}


# --- state and cheaper dedup ---------------------------------------------------------------

def dedup_state_bytes(ids_per_bucket_day: Sequence[int] = (1_000, 10_000, 100_000)
                      ) -> list[dict[str, Any]]:
    """Bytes per event_id of the dedup state value as the runner stores it: a SeenIds
    (day → set of ids) encoded with the state's PickleCoder, for ids as generated (32 hex
    characters); and its in-memory size (sys.getsizeof of the set and its strings)."""
    import random

    from apache_beam.coders import PickleCoder

    from transforms.dedup import SeenIds

    rng = random.Random(7)
    out = []
    for n in ids_per_bucket_day:
        ids = {f"{rng.getrandbits(128):032x}" for _ in range(n)}
        encoded = PickleCoder().encode(SeenIds({20_000: ids}))
        memory = sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)
        out.append({"ids": n, "encoded_bytes_per_id": len(encoded) / n,
                    "memory_bytes_per_id": memory / n})
    return out


class Bloom:
    """A plain Bloom filter (k hashes from one blake2b digest, double hashing)."""

    def __init__(self, n: int, p: float) -> None:
        self.m = max(8, int(-n * math.log(p) / math.log(2) ** 2))
        self.k = max(1, round(self.m / n * math.log(2)))
        self.bits = bytearray((self.m + 7) // 8)

    def _positions(self, key: str) -> list[int]:
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
        return [(h1 + i * h2) % self.m for i in range(self.k)]

    def add_if_new(self, key: str) -> bool:
        """True if `key` was (probably) not seen; adds it."""
        new = False
        for pos in self._positions(key):
            byte, bit = divmod(pos, 8)
            if not self.bits[byte] >> bit & 1:
                new = True
                self.bits[byte] |= 1 << bit
        return new


def bloom_error(n: int, p: float, seed: int = 3) -> dict[str, Any]:
    """Measured share of unique ids a Bloom filter sized for n ids at p wrongly calls
    duplicates, after n distinct ids were added (the filter full)."""
    import random

    rng = random.Random(seed)
    bloom = Bloom(n, p)
    wrongly_dropped = sum(not bloom.add_if_new(f"{rng.getrandbits(128):032x}")
                          for _ in range(n))
    return {"ids": n, "target_p": p, "bits_per_id": bloom.m / n, "hashes": bloom.k,
            "measured_false_duplicates": wrongly_dropped / n}


def horizon_error(data_dir: str, horizons_h: Sequence[int] = (1, 6, 24, 48)
                  ) -> list[dict[str, Any]]:
    """For a dedup horizon of H hours after the end of an event's UTC day (instead of the
    3-day lateness), the share of duplicates that would arrive after their id was
    forgotten and so be counted twice; measured on the generated dataset (its arrival
    clock, arrival_ms.txt)."""
    import orjson

    from transforms.parse import parse_event_time

    arrivals = [int(x) for x in Path(data_dir, "arrival_ms.txt").read_text().split()]
    payloads: list[bytes] = []
    for path in sorted(Path(data_dir).glob("events-*.jsonl")):
        payloads.extend(path.read_bytes().splitlines())
    seen: set[str] = set()
    late_by_ms: list[int] = []  # per duplicate: arrival - end of its event's day
    for arrival, payload in zip(arrivals, payloads, strict=True):
        try:
            record = orjson.loads(payload)
            event_id, t = record["event_id"], parse_event_time(record["event_time"])
        except Exception:
            continue
        if not isinstance(event_id, str):
            continue
        if event_id in seen:
            day_end = t - t % 86_400_000 + 86_400_000
            late_by_ms.append(arrival - day_end)
        else:
            seen.add(event_id)
    return [{"horizon_h": h, "duplicates": len(late_by_ms),
             "double_counted": sum(d > h * 3_600_000 for d in late_by_ms),
             "share_of_unique": sum(d > h * 3_600_000 for d in late_by_ms) / len(seen)}
            for h in horizons_h]


def dataset_shares(data_dir: Path) -> dict[str, float]:
    """Mean payload size and the duplicate and dead-letter shares of the dataset."""
    counts = json.loads((data_dir / "expected.json").read_text())["counts"]
    sizes = [len(line) for path in sorted(data_dir.glob("events-*.jsonl"))
             for line in path.read_bytes().splitlines()]
    return {"mean_payload_bytes": statistics.mean(sizes),
            "duplicate_share": counts["duplicates"] / counts["read"],
            "dead_letter_share": counts["dead_letter"] / counts["read"]}


# --- the report ---------------------------------------------------------------------------

def run_prefix(data_dir: Path, upto: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "benchmarks.capacity", "--_prefix", str(upto),
                        "--_data", str(data_dir), "--_result", out.name],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-bot-policy", action="store_true",
                        help="also measure the bot policy stage (a group per device and "
                             "minute: slow on a day of data)")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "bench-data"))
    parser.add_argument("--from-json", help="rewrite OUT/capacity.md from a capacity.json")
    parser.add_argument("--_prefix", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_data", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._prefix is not None:
        measure_prefix(args._data, args._prefix, args._result)
        return 0
    out = Path(args.out)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report.update(dataset_shares(Path(report["dataset"])))
        write(out, report)
        return 0

    from benchmarks.run import dataset, environment

    data_dir = dataset(Path(args.data_dir), args.events, args.seed)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    stages_run = STAGES if args.with_bot_policy else STAGES[:-1]
    for repeat in range(args.repeats):
        for upto, stage in enumerate(stages_run):
            result = run_prefix(data_dir, upto)
            runs[stage].append(result)
            print(f"[capacity] repeat {repeat + 1}/{args.repeats} up to {stage}: "
                  f"{result['cpu_s']:.2f} CPU s, {result['wall_s']:.2f} wall s",
                  file=sys.stderr, flush=True)
    read = max(r["counters"].get("read", 0) for r in runs["parse"])
    median_cpu = {s: statistics.median(r["cpu_s"] for r in runs[s]) for s in stages_run}
    stages = []
    previous = 0.0
    for stage in stages_run:
        # hot_keys and bot_policy are measured on top of the whole graph (sink included).
        added = median_cpu[stage] - previous
        stages.append({"stage": stage, "prefix_cpu_s_median": median_cpu[stage],
                       "prefix_cpu_s_all": [r["cpu_s"] for r in runs[stage]],
                       "added_cpu_s": added, "us_per_event": added / read * 1e6})
        previous = median_cpu[stage]
    report = {
        "environment": environment(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "events_read": read, "dataset": str(data_dir), "repeats": args.repeats,
        "counters": runs["sink_duckdb"][0]["counters"],
        "stages": stages,
        "window_keys": runs["sink_duckdb"][0]["window_keys"],
        "dedup_state": dedup_state_bytes(),
        "bloom": [bloom_error(200_000, p) for p in (1e-2, 1e-3, 1e-4)],
        "horizon": horizon_error(str(data_dir)),
        **dataset_shares(data_dir),
    }
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(out, report)
    return 0


def write(out: Path, report: dict[str, Any]) -> None:
    """OUT/results-capacity-<date>.json and .md, the date of the measurement."""
    date = report.get("measured_at", time.strftime("%Y-%m-%dT", time.gmtime()))[:10]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-capacity-{date}.json").write_text(json.dumps(report, indent=1))
    (out / f"results-capacity-{date}.md").write_text(markdown(report))
    print(markdown(report))


RATES = {"average": 11_600, "peak": 58_000}  # events/s: a billion a day, 5x peaks
EVENTS_PER_DAY = 1_000_000_000
TARGET_UTILIZATION = 0.7  # headroom kept on each core (an assumption, not a measurement)
STATE_DAYS = 4  # ids of the current day + 3 days of allowed lateness are held
BUNDLE_EVENTS = 1000  # Beam's Flink runner default --max_bundle_size


def model(r: dict[str, Any]) -> dict[str, Any]:
    """The measured inputs extrapolated to RATES. Every input is from `r` (measured);
    the formulas are the model's (docs/capacity.md)."""
    us = {s["stage"]: s["us_per_event"] for s in r["stages"]}
    core_us = sum(us[s] for s in ("read", "parse", "dedup", "metrics", "retract",
                                  "sink_duckdb"))
    state = max(r["dedup_state"], key=lambda d: d["ids"])
    ids_held = EVENTS_PER_DAY * (1 - r["duplicate_share"]) * STATE_DAYS
    keys = r["window_keys"]
    per_firing = 2 * (keys["hour"]["max_keys"] + keys["day"]["max_keys"])
    late_bound = 2 * ((24 * 3 + 1) * keys["hour"]["max_keys"]
                      + (3 + 1) * keys["day"]["max_keys"])
    out: dict[str, Any] = {
        "python_us_per_event": core_us,  # the bounded path: a lower bound for streaming
        "python_us_per_event_with_hot_keys": core_us + us["hot_keys"],
        "ids_held": ids_held,
        "rocksdb_bytes": ids_held * state["encoded_bytes_per_id"],
        "heap_bytes": ids_held * state["memory_bytes_per_id"],
        "changelog_rows_per_s_early": per_firing / 60,
        "changelog_rows_per_s_late_bound": late_bound / 60,
        "kafka_bytes_per_day": EVENTS_PER_DAY * r["mean_payload_bytes"],
        "rates": {},
    }
    for name, rate in RATES.items():
        out["rates"][name] = {
            "events_per_s": rate,
            "python_vcpus": rate * core_us / 1e6 / TARGET_UTILIZATION,
            "python_vcpus_with_hot_keys": rate * (core_us + us["hot_keys"]) / 1e6
            / TARGET_UTILIZATION,
            "dead_letter_rows_per_s": rate * r["dead_letter_share"],
            # A bucket's value (every id it holds, all open days) is rewritten whole by
            # each bundle that touches it: rate / bundle size bundles a second, each
            # touching min(buckets, bundle size) buckets of state / buckets bytes.
            "dedup_state_write_bytes_per_s": {
                str(b): rate * ids_held * state["encoded_bytes_per_id"]
                / max(b, BUNDLE_EVENTS) for b in (10_000, 100_000, 1_000_000)},
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [
        "# Capacity inputs (benchmarks/capacity.py)", "",
        f"Beam {env['apache_beam']} · Python {env['python']} · {env['cpus']} CPUs · "
        f"commit {env['commit']} · load average before "
        f"{', '.join(f'{x:.2f}' for x in r['load_average_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in r['load_average_after'])}", "",
        f"FnApiRunner, batch, one worker, {r['events_read']:,} records read; each graph "
        f"prefix in its own process, {r['repeats']} repeats, median CPU seconds "
        "(user+sys). A stage's cost is what its prefix adds, per record read.", "",
        "| stage | prefix CPU s (median) | all repeats | added CPU s | µs per event |",
        "|---|---:|---|---:|---:|",
    ]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['prefix_cpu_s_median']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in s['prefix_cpu_s_all'])} | "
                     f"{s['added_cpu_s']:.2f} | {s['us_per_event']:.1f} |")
    lines += ["", "Dedup state (one bucket-day value, PickleCoder as stored):", "",
              "| ids | encoded bytes/id | in-memory bytes/id |", "|---:|---:|---:|"]
    for d in r["dedup_state"]:
        lines.append(f"| {d['ids']:,} | {d['encoded_bytes_per_id']:.1f} | "
                     f"{d['memory_bytes_per_id']:.1f} |")
    lines += ["", "Bloom-filter dedup (sized for n ids at p, then fed n distinct ids one at a "
              "time, as dedup would):", "",
              "| n | target p | bits/id | hashes | measured unique ids called duplicates |",
              "|---:|---:|---:|---:|---:|"]
    for b in r["bloom"]:
        lines.append(f"| {b['ids']:,} | {b['target_p']:g} | {b['bits_per_id']:.1f} | "
                     f"{b['hashes']} | {b['measured_false_duplicates']:.5%} |")
    lines += ["", "Shorter dedup horizon (after the end of the event's UTC day), on the "
              "generated dataset's arrival clock:", "",
              "| horizon h | duplicates | counted twice | share of unique events |",
              "|---:|---:|---:|---:|"]
    for h in r["horizon"]:
        lines.append(f"| {h['horizon_h']} | {h['duplicates']:,} | {h['double_counted']:,} | "
                     f"{h['share_of_unique']:.4%} |")
    lines += ["", "Keys per window in metric_latest (what one pane firing can re-emit):", ""]
    for g, k in sorted(r["window_keys"].items()):
        lines.append(f"- {g}: {k['windows']} windows, max {k['max_keys']} keys, "
                     f"mean {k['mean_keys']:.1f}")
    m = model(r)
    gib = 2 ** 30
    lines += ["", "## Extrapolated (model of docs/capacity.md; inputs above)", "",
              f"Python cost per event, read → DuckDB sink: {m['python_us_per_event']:.1f} µs "
              f"({m['python_us_per_event_with_hot_keys']:.1f} µs with the hot-key sketch, "
              "whose bounded cost is its worst case: a bundle spanning a day of windows); "
              f"cores kept at {TARGET_UTILIZATION:.0%} busy. Measured on the bounded path "
              "(no dedup state, no triggers): a lower bound for the streaming job, whose "
              "state and trigger work comes on top.", "",
              "| load | events/s | Python vCPUs | + hot keys | dead-letter rows/s |",
              "|---|---:|---:|---:|---:|"]
    for name, x in m["rates"].items():
        lines.append(f"| {name} | {x['events_per_s']:,} | {x['python_vcpus']:.1f} | "
                     f"{x['python_vcpus_with_hot_keys']:.1f} | "
                     f"{x['dead_letter_rows_per_s']:.1f} |")
    lines += ["", f"Dedup state: {m['ids_held'] / 1e9:.1f} billion ids held ({STATE_DAYS} "
              f"days of unique events); encoded as stored: {m['rocksdb_bytes'] / gib:,.0f} GiB "
              f"(RocksDB, before its own compression and space amplification); as Python "
              f"objects on a heap: {m['heap_bytes'] / gib:,.0f} GiB.", "",
              "Dedup state rewritten per second (a bucket's value, every id of its open "
              f"days, is rewritten whole by each bundle that touches it; bundles of "
              f"{BUNDLE_EVENTS:,} events):", "",
              "| load | 10k buckets | 100k buckets | 1M buckets |", "|---|---:|---:|---:|"]
    for name, x in m["rates"].items():
        w = x["dedup_state_write_bytes_per_s"]
        lines.append(f"| {name} | " + " | ".join(
            f"{w[b] / gib:,.2f} GiB/s" for b in ("10000", "100000", "1000000")) + " |")
    lines += ["", f"Changelog (BigQuery rows/s; Bigtable writes are half: no retractions): "
              f"{m['changelog_rows_per_s_early']:.1f}/s from early panes of the open hour "
              f"and day, at most {m['changelog_rows_per_s_late_bound']:.1f}/s with late "
              "panes for every window inside the lateness (60 s firing periods); set by the "
              "number of keys per window, not by the event rate.",
              f"Kafka: {m['kafka_bytes_per_day'] / gib:,.0f} GiB a day of payloads "
              f"(mean {r['mean_payload_bytes']:.0f} bytes), before compression and "
              "replication."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
