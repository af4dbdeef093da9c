#!/usr/bin/env python
"""Smoke test of the runner presets (a script, not a pytest module).

Two small pipelines per runner, both using ``runners.preset_args``:

* batch: ~1000 keyed elements with event-time timestamps -> a stateful DoFn (a
  ValueState and an event-time timer) -> hourly FixedWindows with
  AfterWatermark(early=AfterProcessingTime(60), late=AfterCount(1)), ACCUMULATING,
  3 days allowed lateness -> CombinePerKey(sum) -> WriteToText; the file is then
  checked against sums computed here.
* panes (streaming TestStream, Direct and Prism only): the same windowing with an
  early, an on-time and a late firing, written with the PaneInfo each pane got, to
  check the timing labels (EARLY / ON_TIME / LATE) the runner gives.

Usage (from the repository root):

    scripts/fetch_prism                       # once, builds .cache/bin/prism
    .venv/bin/python tests/runners_smoke.py --runner direct --runner prism
    .venv/bin/python tests/runners_smoke.py --runner flink   # needs the job server jar

Prism's job service and Beam's LOOPBACK worker pool bind every interface (":port",
"[::]:port"), so by default the script re-runs itself in a private network namespace
(``unshare --net``, only loopback up) when it runs as root: nothing it starts can be
reached from outside. ``--no-netns`` turns that off.
Exit code 0 when every requested check passed; a JSON summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import apache_beam as beam
from apache_beam.coders import StrUtf8Coder, TupleCoder, VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Timestamp

from runners import preset_args
from runners.flink import use_job_server_tmpdir

NETNS_ENV = "RUNNERS_SMOKE_IN_NETNS"
HOUR = 3600
BASE = 1_700_000_000 - 1_700_000_000 % 86_400  # a UTC midnight
N_ELEMENTS = 1000
N_KEYS = 10
N_HOURS = 3
TIMER_AT = BASE + 4 * HOUR + 1800  # event-time timer of the stateful step
TIMING_NAMES = {0: "EARLY", 1: "ON_TIME", 2: "LATE", 3: "UNKNOWN"}


def make_elements() -> list[tuple[str, int, int]]:
    """(key, value, event time in seconds) spread over N_HOURS hourly windows."""
    return [
        (f"k{i % N_KEYS}", i % 7 + 1, BASE + (i * 37) % (N_HOURS * HOUR))
        for i in range(N_ELEMENTS)
    ]


def expected_sums(elements: list[tuple[str, int, int]]) -> dict[tuple[str, int], int]:
    sums: dict[tuple[str, int], int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for key, value, ts in elements:
        sums[(key, ts - ts % HOUR)] += value
        counts[key] += 1
    for key, n in counts.items():  # what the timer of the stateful step emits
        sums[(f"timer:{key}", TIMER_AT - TIMER_AT % HOUR)] += n
    return dict(sums)


class CountWithTimer(beam.DoFn):
    """Passes elements through; counts them per key in a ValueState and emits the
    count from an event-time timer (so the timer's output lands in a later window)."""

    COUNT = userstate.ReadModifyWriteStateSpec("count", VarIntCoder())
    FLUSH = userstate.TimerSpec("flush", TimeDomain.WATERMARK)

    def process(
        self,
        element: tuple[str, int],
        count: Any = beam.DoFn.StateParam(COUNT),
        flush: Any = beam.DoFn.TimerParam(FLUSH),
    ) -> Iterator[tuple[str, int]]:
        n = count.read() or 0
        if n == 0:
            flush.set(Timestamp(TIMER_AT))
        count.write(n + 1)
        yield element

    @userstate.on_timer(FLUSH)
    def on_flush(
        self,
        key: Any = beam.DoFn.KeyParam,
        count: Any = beam.DoFn.StateParam(COUNT),
    ) -> Iterator[tuple[str, int]]:
        yield f"timer:{key}", count.read() or 0
        count.clear()


class FormatPane(beam.DoFn):
    """One JSON line per fired pane, with the PaneInfo the runner attached."""

    def process(
        self,
        kv: tuple[str, int],
        win: Any = beam.DoFn.WindowParam,
        pane: Any = beam.DoFn.PaneInfoParam,
    ) -> Iterator[str]:
        key, value = kv
        yield json.dumps(
            {
                "key": key,
                "window_start": int(win.start.micros // 1_000_000),
                "value": value,
                "timing": TIMING_NAMES.get(pane.timing, str(pane.timing)),
                "is_first": pane.is_first,
                "is_last": pane.is_last,
                "index": pane.index,
            },
            sort_keys=True,
        )


class AppendLines(beam.DoFn):
    """Streaming-safe local sink: appends each line to one file (O_APPEND)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def process(self, line: str) -> Iterator[None]:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        return iter(())


def windowing(name: str) -> beam.PTransform:  # type: ignore[type-arg]
    return name >> beam.WindowInto(
        window.FixedWindows(HOUR),
        trigger=trigger.AfterWatermark(
            early=trigger.AfterProcessingTime(60), late=trigger.AfterCount(1)
        ),
        accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
        allowed_lateness=3 * 86_400,
    )


def run_batch(argv: list[str], out_dir: Path) -> dict[str, Any]:
    elements = make_elements()
    prefix = out_dir / "batch"
    start = time.monotonic()
    options = PipelineOptions(argv)
    use_job_server_tmpdir(options)
    with beam.Pipeline(options=options) as p:
        _ = (
            p
            | "Create" >> beam.Create(elements)
            | "Stamp" >> beam.Map(lambda e: window.TimestampedValue((e[0], e[1]), e[2]))
            | "Stateful"
            >> beam.ParDo(CountWithTimer()).with_input_types(tuple[str, int])
            | windowing("Hourly")
            | "Sum" >> beam.CombinePerKey(sum)
            | "Format" >> beam.ParDo(FormatPane())
            | "Write" >> beam.io.WriteToText(str(prefix), file_name_suffix=".jsonl")
        )
    wall = time.monotonic() - start
    rows = [
        json.loads(line)
        for f in sorted(out_dir.glob("batch*.jsonl"))
        for line in f.open()
    ]
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        k = (row["key"], row["window_start"])
        if k not in latest or row["value"] >= latest[k]["value"]:
            latest[k] = row
    got = {k: r["value"] for k, r in latest.items()}
    want = expected_sums(elements)
    timings: dict[str, int] = defaultdict(int)
    for row in rows:
        timings[row["timing"]] += 1
    problems = []
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        wrong = [
            (k, got[k], want[k])
            for k in sorted(set(got) & set(want))
            if got[k] != want[k]
        ]
        extra = sorted(set(got) - set(want))[:3]
        problems.append(
            f"sums differ: missing={missing} wrong={wrong[:3]} extra={extra}"
        )
    return {
        "ok": not problems,
        "wall_s": round(wall, 2),
        "rows": len(rows),
        "key_windows": len(want),
        "pane_timings": dict(timings),
        "problems": problems,
    }


def run_panes(argv: list[str], out_dir: Path) -> dict[str, Any]:
    """TestStream: early pane, on-time pane, then a late element."""
    path = out_dir / "panes.jsonl"

    def tv(value: int, offset: int) -> window.TimestampedValue:
        return window.TimestampedValue(("a", value), BASE + offset)

    # A KV coder: Prism reads the key of a stateful stage's input from the encoded element
    # (the default FastPrimitivesCoder made it panic with "zero length key").
    stream = (
        TestStream(coder=TupleCoder((StrUtf8Coder(), VarIntCoder())))
        .advance_watermark_to(BASE)
        .add_elements([tv(1, 10), tv(2, 20)])
        .advance_processing_time(61)  # -> EARLY pane, value 3
        .add_elements([tv(3, 30)])
        .advance_processing_time(61)  # -> EARLY pane, value 6
        .advance_watermark_to(BASE + HOUR)  # -> ON_TIME pane, value 6
        .add_elements(
            [tv(4, 40)]
        )  # late (inside allowed lateness) -> LATE pane, value 10
        .advance_processing_time(61)
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(argv)
    options.view_as(StandardOptions).streaming = True
    use_job_server_tmpdir(options)
    start = time.monotonic()
    with beam.Pipeline(options=options) as p:
        _ = (
            p
            | "Stream" >> stream
            | "Stateful"
            >> beam.ParDo(CountWithTimer()).with_input_types(tuple[str, int])
            | windowing("Hourly")
            | "Sum" >> beam.CombinePerKey(sum)
            | "Format" >> beam.ParDo(FormatPane())
            | "Append" >> beam.ParDo(AppendLines(str(path)))
        )
    wall = time.monotonic() - start
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    panes = sorted(
        (r for r in rows if r["key"] == "a" and r["window_start"] == BASE),
        key=lambda r: r["index"],
    )
    seen = [(r["timing"], r["value"], r["index"]) for r in panes]
    problems = []
    values = [r["value"] for r in panes]
    if not panes or values[-1] != 10:
        problems.append(f"final value {values[-1] if values else None} != 10")
    if not any(r["timing"] == "EARLY" for r in panes):
        problems.append("no EARLY pane")
    if [r["value"] for r in panes if r["timing"] == "ON_TIME"] != [6]:
        problems.append("expected exactly one ON_TIME pane with value 6")
    if [r["value"] for r in panes if r["timing"] == "LATE"] != [10]:
        problems.append("expected exactly one LATE pane with value 10")
    if any(r["timing"] == "EARLY" and r["value"] == 10 for r in panes):
        problems.append("late data labelled EARLY")
    if [r["index"] for r in panes] != list(range(len(panes))):
        problems.append("pane indexes not 0..n-1")
    return {
        "ok": not problems,
        "wall_s": round(wall, 2),
        "panes": seen,
        "is_first": [r["is_first"] for r in panes],
        "is_last": [r["is_last"] for r in panes],
        "problems": problems,
    }


def runner_argv(runner: str, args: argparse.Namespace) -> list[str] | None:
    if runner == "prism":
        argv = preset_args("prism")
        loc = next(
            a.split("=", 1)[1] for a in argv if a.startswith("--prism_location=")
        )
        if not Path(loc).is_file():
            return None
        return argv
    if runner == "flink":
        # Batch smoke: no checkpoints/RocksDB needed for a bounded job.
        overrides: dict[str, object] = {
            "checkpointing_interval": None,
            "state_backend": None,
            "state_backend_storage_path": None,
            "externalized_checkpoints_enabled": None,
            "retain_externalized_checkpoints_on_cancellation": None,
            "min_pause_between_checkpoints": None,
        }
        if args.flink_version:
            overrides["flink_version"] = args.flink_version
        if args.flink_job_server_jar:
            overrides["flink_job_server_jar"] = args.flink_job_server_jar
        argv = preset_args("flink", **overrides)
        if (
            not any(a.startswith("--flink_job_server_jar=") for a in argv)
            and not args.flink_download
        ):
            return None
        return argv
    return preset_args(runner)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runner", action="append", choices=["direct", "prism", "flink"]
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: a temp dir)"
    )
    parser.add_argument(
        "--no-netns", action="store_true", help="do not isolate the network"
    )
    parser.add_argument(
        "--skip-panes", action="store_true", help="skip the TestStream check"
    )
    parser.add_argument("--flink_version", default=None)
    parser.add_argument("--flink_job_server_jar", default=None)
    parser.add_argument(
        "--flink-download",
        action="store_true",
        help="run Flink even without a cached jar (Beam then downloads it itself)",
    )
    args = parser.parse_args()
    runners = args.runner or ["direct", "prism", "flink"]

    if (
        not args.no_netns
        and os.environ.get(NETNS_ENV) != "1"
        and os.geteuid() == 0
        and shutil.which("unshare")
        and shutil.which("ip")
    ):
        env = dict(os.environ, **{NETNS_ENV: "1"})
        cmd = [sys.executable, *sys.argv]
        shell = "ip link set lo up && exec " + " ".join(_quote(c) for c in cmd)
        return subprocess.call(["unshare", "--net", "sh", "-c", shell], env=env)

    out_root = (
        Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="runners_smoke_"))
    )
    summary: dict[str, Any] = {}
    for runner in runners:
        argv = runner_argv(runner, args)
        if argv is None:
            what = (
                "scripts/fetch_prism"
                if runner == "prism"
                else "scripts/fetch_flink_jobserver"
            )
            summary[runner] = {"skipped": f"binary/jar missing: run {what}"}
            continue
        summary[runner] = {"argv": argv}
        parts = [("batch", run_batch)]
        if not args.skip_panes and runner != "flink":
            parts.append(("panes", run_panes))
        for part, fn in parts:
            out_dir = out_root / runner / part
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            print(f"=== {runner} / {part}: {' '.join(argv)}", flush=True)
            start = time.monotonic()
            try:
                summary[runner][part] = fn(argv, out_dir)
            except Exception as exc:
                traceback.print_exc()
                summary[runner][part] = {
                    "ok": False,
                    "wall_s": round(time.monotonic() - start, 2),
                    "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                }
            print(
                f"=== {runner} / {part}: {json.dumps(summary[runner][part])}",
                flush=True,
            )

    print(json.dumps(summary, indent=1))
    failed = [
        f"{r}/{p}"
        for r, res in summary.items()
        for p, v in res.items()
        if isinstance(v, dict) and v.get("ok") is False
    ]
    passed = sum(
        1
        for res in summary.values()
        for v in res.values()
        if isinstance(v, dict) and v.get("ok")
    )
    print(
        f"runners_smoke: {passed} passed, {len(failed)} failed"
        + (f": {failed}" if failed else "")
    )
    return 1 if failed else 0


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


if __name__ == "__main__":
    sys.exit(main())
