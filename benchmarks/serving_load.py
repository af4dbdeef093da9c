"""Serving under load: `clickstream serve` over DuckDB and over the Bigtable emulator.

`python -m benchmarks.serving_load [--days 31] [--events_per_day 1500] [--requests 300]`

Generates consecutive days of one user population, runs the job once (`--distinct hll`)
into a DuckDB file and the Bigtable emulator (127.0.0.1, free port), then for each
serving setup starts `clickstream serve` as its own process on a free 127.0.0.1 port:

- duckdb: the default (answers reused while the file is unchanged: see
  serving/stores.py's DuckDBStore);
- duckdb --no_cache: every request opens the file (the cost when the job keeps writing);
- bigtable: the emulator, read per request;
- bigtable-5s: the emulator, answers reused for up to 5 s (--max_staleness_s 5).

Against each, a small keep-alive asyncio client (one connection per concurrent client,
on uvloop; httpx cost more CPU per request than the server's cached answer) sends a
fixed number of requests per endpoint at 1, 8 and 32 concurrent clients (after two
warm-up requests on every connection): a 30-day daily series, an MAU
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
import urllib.parse
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

import uvloop

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


class KeepAliveConnection:
    """One HTTP/1.1 keep-alive connection that sends GETs and reads each answer (status
    line, headers, a Content-Length body). A client this small keeps its own CPU off the
    two cores the server also runs on, where httpx's per-request work is several times
    the server's cached answer."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, target: bytes) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: " + self._host.encode()
                           + b"\r\n\r\n")
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise
        return int(head[9:12])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def load(url: str, path: str, params: dict[str, Any], requests: int,
               concurrency: int) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    target = (path + "?" + urllib.parse.urlencode(params) if params else path).encode()
    connections = [KeepAliveConnection(parsed.hostname or "127.0.0.1", parsed.port or 80)
                   for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    remaining = requests
    # Warm-up on every connection at once: connections open, the server's imports and
    # first answer are done before anything is timed.
    async def warm(connection: KeepAliveConnection) -> None:
        for _ in range(2):
            await connection.get(target)

    await asyncio.gather(*(warm(c) for c in connections))

    async def worker(connection: KeepAliveConnection) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                errors += await connection.get(target) != 200
            except (OSError, asyncio.IncompleteReadError):  # counted; the run goes on
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    for c in connections:
        c.close()
    return {"requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / wall,
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99)}


def measure(setup: str, url: str, last: date, requests: int) -> list[dict[str, Any]]:
    rows = []
    for name, (path, params) in endpoints(last).items():
        for concurrency in CONCURRENCY:
            result = uvloop.run(load(url, path, params, requests, concurrency))
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
        "in its own process (uvicorn, one worker, httptools and uvloop); a small "
        "keep-alive asyncio client (uvloop) on the same machine sends "
        f"{cfg['requests']} requests per endpoint and concurrency after two warm-up "
        "requests on each connection. *duckdb* reuses answers while the file is unchanged, *duckdb "
        "(no cache)* opens the file per request, *bigtable* reads the emulator per "
        "request, *bigtable-5s* reuses an answer for up to 5 s "
        f"(`--max_staleness_s 5`). Goal: p99 < {GOAL_P99_MS:.0f} ms for the 30-day series "
        "and the MAU.",
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
                                                        "bigtable", "bigtable-5s"])
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
                      "bigtable": ["--from", "bigtable", *bigtable],
                      "bigtable-5s": ["--from", "bigtable", *bigtable,
                                      "--max_staleness_s", "5"]}
        for setup in args.setups:
            say(f"serving over {setup}")
            with clickstream_serve(*connection[setup]) as url:
                report["runs"] += measure(setup, url, last, args.requests)
    write_report(report, "serving-load", args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
