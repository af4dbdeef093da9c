"""Accuracy of any-range unique users from stored HLL sketches, against exact sets.

`python -m benchmarks.serving_accuracy [--days 45] [--events_per_day 40000] [--users 100000]`

Generates consecutive days of one user population (pipeline/generator.py: Zipf-skewed
users, so heavy users come daily and the long tail now and then), and for each lg_k:

- builds each day's sketch with the pipeline's own combine (`HllDistinctFn`: the bytes
  the sinks store), and the exact identity set of each day (plain Python sets);
- for every DAU, WAU (7 days), rolling-28 and MAU (30 days) window that fits in the
  generated days, unions the daily sketches (`transforms.distinct.union_estimate`, what
  the API does) and compares with the exact union: relative error, mean, p95 and max,
  and how often the exact answer falls inside the answer's 2-sigma bounds;
- writes the daily sketches to a DuckDB file as the sink does and times the API's MAU
  path (`serving.stores.DuckDBStore.sketches` + the union), p50/p95 over repeated calls;
- times the exact answer from the raw archive (`serving.uniques.from_archive`, Avro by
  event_date/hour) for a WAU and an MAU, the cost of `--distinct exact` serving.

Writes benchmarks/results-serving-accuracy-DATE.{json,md}, with the load average and CPU
count (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.run import ROOT, say
from benchmarks.serving_results import new_report, percentile, report_header, write_report
from pipeline.generator import ClickstreamGenerator, GeneratorConfig, day_configs
from serving import uniques
from serving.stores import DuckDBStore
from transforms.distinct import HllDistinctFn, hll_relative_standard_error, union_estimate

LG_KS = (10, 12, 14)
RANGES = (("DAU", 1), ("WAU", 7), ("rolling-28", 28), ("MAU", 30))


def daily_identities(days: int, events: int, users: int, seed: int
                     ) -> tuple[dict[date, set[str]], dict[date, list[dict[str, Any]]]]:
    """Exact identity sets per event-time day, and each day's events as archive records."""
    identities: dict[date, set[str]] = defaultdict(set)
    records: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for config in day_configs(GeneratorConfig(events=events, seed=seed, users=users,
                                              date="2026-10-01"), days):
        started = time.monotonic()
        _, truth, _ = ClickstreamGenerator(config).generate()
        for event in truth:
            day = datetime.fromtimestamp(event.event_time_ms / 1000, tz=UTC).date()
            identities[day].add(event.identity)
            records[day].append({
                "event_id": event.event_id, "event_type": event.event_type,
                "event_time": event.event_time_ms, "device_id": "d", "user_id":
                event.identity, "session_id": None, "platform": None, "properties": {}})
        say(f"  generated {config.date}: {len(truth):,} events "
            f"({time.monotonic() - started:.1f} s)")
    return identities, records


def daily_sketch(ids: set[str], lg_k: int) -> tuple[int, bytes]:
    fn = HllDistinctFn(lg_k)
    acc = fn.create_accumulator()
    for identity in ids:
        acc = fn.add_input(acc, identity)
    value, sketch = fn.extract_output(acc)
    return value, sketch


def accuracy(days: list[date], identities: dict[date, set[str]],
             sketches: dict[date, bytes], lg_k: int) -> list[dict[str, Any]]:
    rows = []
    for name, length in RANGES:
        errors, inside, sizes = [], 0, []
        for end in range(length - 1, len(days)):
            span = days[end - length + 1:end + 1]
            exact = len(set().union(*(identities[d] for d in span)))
            union = union_estimate([sketches[d] for d in span])
            errors.append(abs(union.estimate - exact) / exact)
            inside += union.lower_bound_2sd <= exact <= union.upper_bound_2sd
            sizes.append(exact)
        if not errors:
            continue
        rows.append({
            "lg_k": lg_k, "range": name, "days": length, "windows": len(errors),
            "exact_mean": round(statistics.mean(sizes)),
            "mean_error": statistics.mean(errors), "p95_error": percentile(errors, 0.95),
            "max_error": max(errors), "rse_1sd": hll_relative_standard_error(lg_k),
            "inside_2sd": inside / len(errors)})
    return rows


def write_store(path: str, sketches: dict[date, bytes], values: dict[date, int]) -> None:
    from transforms import sink_duckdb

    emitted = datetime.now(UTC)
    rows = []
    for day, sketch in sketches.items():
        start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
        rows.append({"metric": "active_users", "dims": "{}", "granularity": "day",
                     "window_start": start, "window_end": start + timedelta(days=1),
                     "value": values[day], "sign": 1, "revision": 1, "pane_index": 0,
                     "timing": "ON_TIME", "is_final": True, "emitted_at": emitted,
                     "sketch": sketch})
    con = sink_duckdb.connect(path)
    try:
        sink_duckdb.create_tables(con)
        sink_duckdb.write_changelog(con, rows)
    finally:
        con.close()


def timed(fn, repeat: int) -> dict[str, float]:
    fn()  # warm: imports, the file's first open
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(samples, 0.5), "p95_ms": percentile(samples, 0.95),
            "calls": repeat}


def write_archive(base: str, records: dict[date, list[dict[str, Any]]]) -> None:
    import fastavro

    import schemas

    schema = fastavro.parse_schema(schemas.event_schema())
    for day, rows in records.items():
        folder = Path(base) / f"event_date={day.isoformat()}" / "event_hour=00"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "part-bench-0-of-1.avro", "wb") as fh:
            fastavro.writer(fh, schema, rows, codec="deflate")


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        *report_header(report, "Unique users over any range: HLL sketch unions vs exact"),
        f"{cfg['days']} generated days (from {cfg['first_day']}), {cfg['events_per_day']:,} "
        f"events a day from one population of {cfg['users']:,} users (Zipf), seed "
        f"{cfg['seed']}: DAU {report['dau_mean']:,} on average, MAU "
        f"{report['mau_mean']:,}. Each day's sketch is built by the pipeline's "
        "`HllDistinctFn` (HLL_8, the bytes the sinks store); a range is the union of its "
        "daily sketches. Error = |estimate − exact| / exact over every window of that "
        "length in the generated days; *inside 2σ* is how often the exact count lies "
        "within the answer's 2-sigma bounds.",
        "",
        "| lg_k | range | windows | exact (mean) | mean error | p95 error | max error | "
        "RSE (1σ) | inside 2σ |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["accuracy"]:
        lines.append(
            f"| {r['lg_k']} | {r['range']} | {r['windows']} | {r['exact_mean']:,} | "
            f"{100 * r['mean_error']:.2f}% | {100 * r['p95_error']:.2f}% | "
            f"{100 * r['max_error']:.2f}% | {100 * r['rse_1sd']:.2f}% | "
            f"{100 * r['inside_2sd']:.0f}% |")
    lines += [
        "",
        "Sketch size and the serving path's MAU latency (30 daily sketches read from "
        "DuckDB through `DuckDBStore.sketches` without its answer cache, so each call "
        "opens the file, reads and unions; p50/p95 over repeated calls, in-process, no "
        "HTTP):",
        "",
        "| lg_k | bytes per daily sketch (mean / max) | MAU query p50 ms | p95 ms |",
        "|---:|---:|---:|---:|",
    ]
    for s in report["sketches"]:
        lines.append(f"| {s['lg_k']} | {s['bytes_mean']:,} / {s['bytes_max']:,} | "
                     f"{s['mau_query']['p50_ms']:.1f} | {s['mau_query']['p95_ms']:.1f} |")
    ex = report["exact"]
    lines += [
        "",
        "Exact answers from the raw archive (`--distinct exact` serving, "
        "`serving.uniques.from_archive`: fastavro over the days' Avro files, one set of "
        f"identities): {ex['records_per_day']:,} archived events a day.",
        "",
        "| range | archive records read | p50 ms | p95 ms |",
        "|---|---:|---:|---:|",
    ]
    for name in ("WAU", "MAU"):
        e = ex[name]
        lines.append(f"| {name} | {e['records']:,} | {e['p50_ms']:.0f} | {e['p95_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_accuracy")
    parser.add_argument("--days", type=int, default=45)
    parser.add_argument("--events_per_day", type=int, default=40_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    report = new_report("benchmarks.serving_accuracy", argv, {
        "days": args.days, "events_per_day": args.events_per_day, "users": args.users,
        "seed": args.seed, "first_day": "2026-10-01"})
    say(f"generating {args.days} days of {args.events_per_day:,} events")
    identities, records = daily_identities(args.days, args.events_per_day, args.users,
                                           args.seed)
    # The generated days proper (late devices add a few events to days before the first).
    first = date(2026, 10, 1)
    days = [first + timedelta(days=i) for i in range(args.days)]
    report["dau_mean"] = round(statistics.mean(len(identities[d]) for d in days))
    report["mau_mean"] = round(statistics.mean(
        len(set().union(*(identities[d] for d in days[i - 29:i + 1])))
        for i in range(29, len(days)))) if len(days) >= 30 else None
    report["accuracy"], report["sketches"] = [], []
    with tempfile.TemporaryDirectory(prefix="serving-accuracy-") as tmp:
        for lg_k in LG_KS:
            say(f"lg_k {lg_k}: sketches, unions, MAU query")
            built = {d: daily_sketch(identities[d], lg_k) for d in days}
            sketches = {d: s for d, (_, s) in built.items()}
            report["accuracy"] += accuracy(days, identities, sketches, lg_k)
            db = os.path.join(tmp, f"lg{lg_k}.duckdb")
            write_store(db, sketches, {d: v for d, (v, _) in built.items()})
            store = DuckDBStore(db, cache=False)  # each call opens and reads the file
            span = days[-30:]
            start = datetime.combine(span[0], datetime.min.time(), tzinfo=UTC)
            end = start + timedelta(days=len(span))
            sizes = [len(s) for s in sketches.values()]
            report["sketches"].append({
                "lg_k": lg_k, "bytes_mean": round(statistics.mean(sizes)),
                "bytes_max": max(sizes),
                "mau_query": timed(lambda store=store, start=start, end=end, span=span:
                                   uniques.from_sketches(store.sketches(
                                       "active_users", "day", "{}", start, end), span),
                                   args.repeat)})
        say("exact answers from the archive")
        archive = os.path.join(tmp, "archive")
        write_archive(archive, records)
        report["exact"] = {"records_per_day": round(statistics.mean(
            len(records[d]) for d in days))}
        for name, length in (("WAU", 7), ("MAU", 30)):
            span = days[-length:]
            answer = uniques.from_archive(archive, "active_users", {}, span)
            assert answer["value"] == len(set().union(*(identities[d] for d in span)))
            report["exact"][name] = {"records": answer["archive_records_read"], **timed(
                lambda span=span: uniques.from_archive(archive, "active_users", {}, span),
                max(3, args.repeat // 10))}
    write_report(report, "serving-accuracy", args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
