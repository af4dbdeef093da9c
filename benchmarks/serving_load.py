"""Serving under load: `clickstream serve` over DuckDB and over the Bigtable emulator.

`python -m benchmarks.serving_load [--days 31] [--events_per_day 1500] [--requests 300]`

Generates consecutive days of one user population, runs the job once (`--distinct hll`)
into a DuckDB file and the Bigtable emulator (127.0.0.1, free port), then for each
serving setup starts `clickstream serve` as its own process on a free 127.0.0.1 port:

- duckdb: the default (answers reused while the file is unchanged: see
  serving/stores.py's DuckDBStore);
- duckdb --no_cache: every request opens the file (the cost when the job keeps writing);
- bigtable: the emulator, read per request.

Against each, a small async client (httpx) sends a fixed number of requests per endpoint
at 1, 8 and 32 concurrent clients (after a warm-up): a 30-day daily series, an MAU
(30-day union of daily sketches), a WAU, a day's funnel, and the health endpoint.
Requests/s and p50/p99 latency per endpoint and concurrency go to
benchmarks/results-serving-load-DATE.{json,md}, with the load average and CPU count (the
client runs on the same 2 cores as the server; others may share them). Goal: p99 under
50 ms for the 30-day series and the MAU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from benchmarks.run import ROOT, say
from benchmarks.serving_results import new_report, percentile, report_header, write_report
from pipeline.generator import GeneratorConfig, write_days
from pipeline.job import run

CONCURRENCY = (1, 8, 32)
GOAL_P99_MS = 50.0
FIRST_DAY = date(2026, 10, 1)
PROJECT, INSTANCE, TABLE = "bench", "bench", "serving_load"


def endpoints(last: date) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "series 30 days": ("/api/series", {
            "metric": "active_users", "granularity": "day",
            "start": (last - timedelta(days=29)).isoformat(),
            "end": (last + timedelta(days=1)).isoformat()}),
        "MAU": ("/api/uniques", {"end": last.isoformat(), "days": 30}),
        "WAU": ("/api/uniques", {"end": last.isoformat(), "days": 7}),
        "funnel": ("/api/funnel", {"end": last.isoformat()}),
        "health": ("/api/health", {}),
    }


async def load(url: str, path: str, params: dict[str, Any], requests: int,
               concurrency: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        for _ in range(min(10, requests)):  # warm-up: connections, the server's imports
            await client.get(path, params=params)

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    response = await client.get(path, params=params)
                    errors += response.status_code != 200
                except httpx.TransportError:  # counted, and the run goes on
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / wall,
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99)}


def measure(setup: str, url: str, last: date, requests: int) -> list[dict[str, Any]]:
    rows = []
    for name, (path, params) in endpoints(last).items():
        for concurrency in CONCURRENCY:
            result = asyncio.run(load(url, path, params, requests, concurrency))
            rows.append({"setup": setup, "endpoint": name, "concurrency": concurrency,
                         "load_1m": round(os.getloadavg()[0], 2), **result})
            say(f"  {setup:16} {name:15} c={concurrency:<3} {result['requests_per_s']:7.1f} "
                f"req/s  p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms"
                f"  errors {result['errors']}")
    return rows


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        *report_header(report, "Serving under load: `clickstream serve` on 127.0.0.1"),
        f"{cfg['days']} generated days × {cfg['events_per_day']:,} events, one run of the "
        "job (`--distinct hll`) into DuckDB and the Bigtable emulator; `clickstream serve` "
        "in its own process (uvicorn, one worker); an httpx async client on the same "
        f"machine sends {cfg['requests']} requests per endpoint and concurrency after 10 "
        "warm-up requests. *duckdb* reuses answers while the file is unchanged, *duckdb "
        "(no cache)* opens the file per request, *bigtable* reads the emulator per "
        f"request. Goal: p99 < {GOAL_P99_MS:.0f} ms for the 30-day series and the MAU.",
        "",
        "| setup | endpoint | clients | req/s | p50 ms | p99 ms | errors | goal | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["runs"]:
        goal = ""
        if r["endpoint"] in ("series 30 days", "MAU"):
            goal = "met" if r["p99_ms"] < GOAL_P99_MS else "missed"
        lines.append(
            f"| {r['setup']} | {r['endpoint']} | {r['concurrency']} | "
            f"{r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['errors']} | {goal} | {r['load_1m']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from tests import servers
    from tests.serve_data import clickstream_serve

    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_load")
    parser.add_argument("--days", type=int, default=31)
    parser.add_argument("--events_per_day", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--setups", nargs="+", default=["duckdb", "duckdb-no-cache",
                                                        "bigtable"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    report = new_report("benchmarks.serving_load", argv, {
        "days": args.days, "events_per_day": args.events_per_day,
        "requests": args.requests, "setups": args.setups})
    report["runs"] = []
    last = FIRST_DAY + timedelta(days=args.days - 1)
    with tempfile.TemporaryDirectory(prefix="serving-load-") as tmp, \
            servers.bigtable_emulator() as emulator:
        os.environ["BIGTABLE_EMULATOR_HOST"] = emulator
        data, db = os.path.join(tmp, "data"), os.path.join(tmp, "served.duckdb")
        say(f"generating {args.days} days × {args.events_per_day:,} events")
        write_days(data, GeneratorConfig(events=args.events_per_day, seed=41,
                                         date=FIRST_DAY.isoformat()), args.days)
        bigtable = ["--bigtable_project", PROJECT, "--bigtable_instance", INSTANCE,
                    "--bigtable_table", TABLE]
        say("running the job into DuckDB and the Bigtable emulator")
        summary = run(["--input_files", os.path.join(data, "events-*.jsonl"),
                       "--duckdb_path", db, "--distinct", "hll", *bigtable],
                      progress_every_s=60)
        assert summary.reconciles
        connection = {"duckdb": ["--duckdb_path", db],
                      "duckdb-no-cache": ["--duckdb_path", db, "--no_cache"],
                      "bigtable": ["--from", "bigtable", *bigtable]}
        for setup in args.setups:
            say(f"serving over {setup}")
            with clickstream_serve(*connection[setup]) as url:
                report["runs"] += measure(setup, url, last, args.requests)
    write_report(report, "serving-load", args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
