"""Benchmark: the clickstream graph vs the same graph with Beam's DeduplicatePerKey.

    python -m benchmarks.run --sizes 100000 1000000 [--out bench-results/]
                             [--skip-baseline] [--profile] [--seed 1]
                             [--runner direct flink] [--flink-parallelism 1 2]
                             [--pipeline-arg=--max_bundle_size=5000 ...]

For each size a dataset is generated once (cached under .cache/bench-data/), then each
graph runs in its own process (benchmarks.measure) on the DirectRunner, batch, one
worker, in memory, writing to a fresh DuckDB file. Per run: events read, wall seconds
around building and running the pipeline (no interpreter start-up or imports), events/s,
CPU seconds (user+sys, getrusage) and events per CPU-second, peak RSS, whether the
counters reconcile and whether DuckDB's metric_latest equals the generator's oracle.
Results go to OUT/results.json and OUT/results.md; --profile adds OUT/profile-graph-N.txt.
``--runner flink`` adds the graph on FlinkRunner ``[local]`` (Beam's Flink job server,
LOOPBACK, in a private network namespace) at each ``--flink-parallelism``, beside the
DirectRunner runs of the same invocation; its CPU and peak RSS count the job server's
Java process too, and the table shows each Flink run's ratio to the DirectRunner's.
Exit status 1 if any run failed or disagreed with the oracle.

    python -m benchmarks.run --streaming [--rates 20 100 300] [--duration-s 60]
                             [--early-firing-s 5] [--catch-up-s 60] [--skip-baseline]

measures the streaming job's lag per publish rate instead (benchmarks/streaming.py),
into OUT/results-streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from benchmarks.procs import status_mib

ROOT = Path(__file__).resolve().parents[1]
MODES = ("graph", "baseline")
MODE_TITLES = {
    "graph": "graph (DeduplicateEvents)",
    "baseline": "baseline (DeduplicatePerKey)",
}


def parse_size(text: str) -> int:
    """100000, 100_000, 100k or 1M."""
    text = text.strip().replace("_", "").lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def say(message: str) -> None:
    print(message, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- datasets -----------------------------------------------------------------------

def _generator_fingerprint(config: Any) -> str:
    """Changes when the generator, the oracle, the funnel or the config change, so a
    cached dataset is never one an older generator made."""
    from pipeline import generator, oracle
    from transforms.metrics import DEFAULT_FUNNEL

    digest = hashlib.sha256()
    for module in (generator, oracle):
        digest.update(Path(module.__file__ or "").read_bytes())
    digest.update(json.dumps([config.__dict__, list(DEFAULT_FUNNEL)], sort_keys=True).encode())
    return digest.hexdigest()[:10]


def dataset(cache_dir: Path, events: int, seed: int) -> Path:
    """The generated dataset for (events, seed), made once per generator version."""
    from pipeline.generator import GeneratorConfig, write_dataset

    config = GeneratorConfig(events=events, seed=seed)
    target = cache_dir / f"events-{events}-seed-{seed}-{_generator_fingerprint(config)}"
    if (target / "expected.json").exists():
        say(f"dataset {events:,} events (seed {seed}): cached in {target}")
        return target
    say(f"dataset {events:,} events (seed {seed}): generating into {target} ...")
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    partial = Path(tempfile.mkdtemp(prefix=f".events-{events}-", dir=cache_dir))
    try:
        counts = write_dataset(str(partial), config)
        try:
            partial.rename(target)
        except OSError:  # another benchmark finished the same dataset first
            if not (target / "expected.json").exists():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    say(f"dataset {events:,} events: {counts['read']:,} lines ({counts['unique']:,} unique, "
        f"{counts['duplicates']:,} duplicates, {counts['dead_letter']:,} malformed) "
        f"in {_clock(time.monotonic() - started)}")
    return target


# --- one run in a child process -------------------------------------------------------

def _forward(stream: TextIO, prefix: str, log: TextIO, tail: list[str],
             watch: Callable[[str], None] | None = None) -> None:
    """Child output → log file (and `watch`, line by line); progress lines and errors →
    the console."""
    for line in stream:
        log.write(line)
        log.flush()
        tail.append(line)
        del tail[:-40]
        if watch is not None:
            watch(line)
        text = line.rstrip()
        if " progress: " in text or "ERROR" in text or "Traceback" in text:
            say(f"{prefix}   {text.split(' INFO ', 1)[-1]}")


# Runs "$0" "$@" after bringing loopback up in a new network namespace.
_LO_UP_AND_EXEC = 'ip link set lo up && exec "$0" "$@"'


def netns_prefix() -> list[str]:
    """Command prefix for a private network namespace with only loopback up (Flink's
    LOOPBACK worker binds every interface)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        raise SystemExit("benchmark: --runner flink needs unshare and ip (util-linux, "
                         "iproute2) to keep the LOOPBACK worker off the network")
    flags = ["--net"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--net"]
    return ["unshare", *flags, "sh", "-c", _LO_UP_AND_EXEC]


def run_child(mode: str, size: int, data_dir: Path, out_dir: Path, heartbeat_s: float,
              profile_path: Path | None = None, runner: str = "direct",
              parallelism: int = 1, extra: Sequence[str] = ()) -> dict[str, Any]:
    where = f" on flink p={parallelism}" if runner == "flink" else ""
    label = f"{mode}{where}{' (cProfile)' if profile_path else ''} @ {size:,}"
    prefix = f"[{label}]"
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    suffix = ("-profile" if profile_path else "") + (
        f"-flink-p{parallelism}" if runner == "flink" else "")
    log_path = logs / f"{size}-{mode}{suffix}.log"
    work = Path(tempfile.mkdtemp(prefix="clickstream-bench-"))
    result_path = work / "result.json"
    command = [sys.executable, "-m", "benchmarks.measure", "--mode", mode,
               "--data", str(data_dir), "--duckdb", str(work / "bench.duckdb"),
               "--result", str(result_path), "--runner", runner,
               "--parallelism", str(parallelism), *extra]
    if runner == "flink":
        command = [*netns_prefix(), *command]
    if profile_path:
        command += ["--profile", str(profile_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    say(f"{prefix} starting (log: {log_path})")
    started = time.monotonic()
    tail: list[str] = []
    try:
        with open(log_path, "w") as log:
            child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
            assert child.stdout is not None
            reader = threading.Thread(target=_forward, args=(child.stdout, prefix, log, tail),
                                      daemon=True)
            reader.start()
            try:
                while True:
                    try:
                        child.wait(timeout=heartbeat_s)
                        break
                    except subprocess.TimeoutExpired:
                        rss = status_mib(child.pid)
                        say(f"{prefix} running, {_clock(time.monotonic() - started)} elapsed"
                            + (f", RSS {rss:,.0f} MiB" if rss is not None else ""))
            except BaseException:
                child.terminate()
                child.wait()
                raise
            reader.join(timeout=10)
        elapsed = time.monotonic() - started
        if child.returncode != 0 or not result_path.exists():
            say(f"{prefix} FAILED (exit {child.returncode}) after {_clock(elapsed)}; "
                f"see {log_path}")
            return {"mode": mode, "size": size, "error": f"exit {child.returncode}",
                    "runner_option": runner, "parallelism": parallelism,
                    "runner": f"FlinkRunner [local] p={parallelism}" if runner == "flink"
                    else "DirectRunner",
                    "log": str(log_path), "log_tail": "".join(tail[-20:])}
        with open(result_path) as f:
            result = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["size"] = size
    result["process_s"] = elapsed
    result["log"] = str(log_path)
    say(f"{prefix} done: {result['events_read']:,} events in {result['wall_s']:.1f} s = "
        f"{result['events_per_s']:,.0f} events/s, {result['events_per_cpu_s']:,.0f} "
        f"events/CPU-s, peak RSS {result['peak_rss_mib']:,.0f} MiB, "
        f"runner {result['runner']}, {_verdict(result)} "
        f"(process {_clock(elapsed)} incl. start-up)")
    return result


def verdict(result: dict[str, Any], problems: Callable[[dict[str, Any]], list[str]]
            ) -> str:
    """'FAILED' for a run that did not finish, else its problems, or 'exact'."""
    if "error" in result:
        return "FAILED"
    found = problems(result)
    return "; ".join(found) if found else "exact"


def _problems(result: dict[str, Any]) -> list[str]:
    return [text for failed, text in (
        (not result["reconciles"], "counters do not reconcile"),
        (not result["counts_match"], "counts differ from generator"),
        (not result["oracle_match"], f"{result['oracle_differences']} oracle differences"),
        (not result["changelog_sums_to_latest"], "changelog does not sum to latest"),
    ) if failed]


def _verdict(result: dict[str, Any]) -> str:
    return verdict(result, _problems)


def run_ok(result: dict[str, Any]) -> bool:
    return _verdict(result) == "exact"


# --- report ---------------------------------------------------------------------------

def _yes(flag: bool) -> str:
    return "yes" if flag else "**NO**"


def _title(report: dict[str, Any], title: str) -> list[str]:
    env = report["environment"]
    return [
        f"# {title}",
        "",
        (f"{report['finished_at']} · Beam {env['apache_beam']} · Python {env['python']} · "
         f"{env['cpus']} CPUs · {env['platform']} · commit {env['commit']}"),
        "",
    ]


def runs_table(runs: Sequence[dict[str, Any]], first: Callable[[dict[str, Any]], str],
               columns: Sequence[str], cells: Callable[[dict[str, Any]], list[str]]
               ) -> list[str]:
    """A markdown table of runs, a row each: `first(run)`, the run's title, then
    `cells(run)`, or FAILED for a run that did not finish. `columns` are the headings
    (ending in ':' for a right-aligned column)."""
    lines = ["| " + " | ".join(c.removesuffix(":") for c in columns) + " |",
             "|" + "|".join("---:" if c.endswith(":") else "---" for c in columns) + "|"]
    for r in runs:
        rest = (cells(r) if "error" not in r else
                [f"FAILED ({r['error']})"] + [""] * (len(columns) - 3))
        lines.append("| " + " | ".join([first(r), MODE_TITLES[r["mode"]], *rest]) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    if report.get("kind") == "streaming":
        return streaming_markdown(report)
    lines = [
        *_title(report, "clickstream-beam benchmark"),
        ("DirectRunner, batch, `--direct_num_workers=1 --direct_running_mode=in_memory`, "
         "DuckDB sink. Each run is its own process; wall and CPU time cover building and "
         "running the pipeline only. The graph dedups with `DeduplicateEvents` (hash "
         "buckets, one state value per bucket); the baseline swaps in Beam's "
         "`DeduplicatePerKey` on event_id, which sends the whole graph to the "
         "BundleBasedDirectRunner."),
        "",
        *_flink_lines(report),
        *runs_table(
            report["runs"], lambda r: f"{r['size']:,}",
            ("events:", "run", "runner", "read:", "wall s:", "events/s:",
             "events/s per worker:", "CPU s (user+sys):", "of it Java:", "events/CPU-s:",
             "CPU/wall:", "peak RSS MiB (Python):", "peak RSS MiB (Java):", "reconciles",
             "counts = generator", "DuckDB = oracle"),
            lambda r: [
                r["runner"], f"{r['events_read']:,}", f"{r['wall_s']:.1f}",
                f"{r['events_per_s']:,.0f}", f"{r['events_per_s'] / r['workers']:,.0f}",
                f"{r['cpu_s']:.1f}", f"{r.get('cpu_java_s', 0.0):.1f}",
                f"{r['events_per_cpu_s']:,.0f}",
                f"{r['cpu_per_wall']:.2f}", f"{r['peak_rss_mib']:,.0f}",
                f"{r.get('peak_rss_java_mib', 0.0):,.0f}",
                _yes(r["reconciles"]), _yes(r["counts_match"]),
                _yes(r["oracle_match"] and r["changelog_sums_to_latest"])]),
    ]
    if report.get("runner_ratios"):
        lines += [
            "",
            ("| events | runner | events/s vs DirectRunner | events/CPU-s vs DirectRunner "
             "| wall s vs DirectRunner |"),
            "|---:|---|---:|---:|---:|",
        ]
        for q in report["runner_ratios"]:
            lines.append(f"| {q['size']:,} | {q['runner']} | {q['events_per_s']:.2f}x "
                         f"| {q['events_per_cpu_s']:.2f}x | {q['wall_s']:.2f}x |")
    if report["speedups"]:
        lines += [
            "",
            ("| events | speed-up graph/baseline (events/s) | (events/CPU-s) "
             "| peak RSS graph/baseline |"),
            "|---:|---:|---:|---:|",
        ]
        for s in report["speedups"]:
            lines.append(f"| {s['size']:,} | {s['events_per_s']:.1f}x "
                         f"| {s['events_per_cpu_s']:.1f}x | {s['peak_rss']:.2f} |")
    lines += [
        "",
        ("Notes: events/s per worker equals events/s (one worker); events/CPU-s counts "
         "every thread of the process (DuckDB, gRPC, the runner), so it is the per-core "
         "figure. The baseline's duplicates are dedup input minus output "
         "(DeduplicatePerKey counts nothing). 'DuckDB = oracle' means metric_latest equals "
         "the generator's exact answer and every window's changelog sums (sign × value) "
         "to its latest value. Small sizes are dominated by fixed cost (pipeline "
         "construction, the DirectRunner trying Prism first)."),
    ]
    if report.get("profile"):
        lines += ["", f"Profile: `{report['profile']}`"]
    return "\n".join(lines) + "\n"


def _flink_lines(report: dict[str, Any]) -> list[str]:
    """What the FlinkRunner rows are, and the machine's load (others share it)."""
    lines = []
    if "flink" in report["arguments"].get("runners", ()):
        extra = report["arguments"].get("extra_pipeline_args") or []
        lines += [
            ("FlinkRunner rows: the same graph on Beam's Flink job server (Flink 1.19 "
             "embedded, `--flink_master=[local]`), LOOPBACK (one Python SDK worker in the "
             "measuring process), batch, no checkpoints, at the parallelism shown, in a "
             "private network namespace. Wall and CPU include starting the job server "
             "JVM; CPU is the Python process plus the job server's Java process (from "
             "/proc), peak RSS is each process's VmHWM."
             + (f" Extra pipeline args: `{' '.join(extra)}`." if extra else "")),
            "",
        ]
    if report.get("load_avg_start"):
        start, end = report["load_avg_start"], report["load_avg_end"]
        lines += [f"Load average (1/5/15 min) at start {start[0]:.1f}/{start[1]:.1f}/"
                  f"{start[2]:.1f}, at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f} on "
                  f"{report['environment']['cpus']} CPUs (other work shares the machine).",
                  ""]
    return lines


def streaming_markdown(report: dict[str, Any]) -> str:
    from benchmarks.streaming import markdown_rows

    args = report["arguments"]
    lines = [
        *_title(report, "clickstream-beam streaming lag benchmark"),
        f"`{args['command']}`",
        "",
        ("Per rate and graph: a fresh Pub/Sub emulator (127.0.0.1), topic and subscription, "
         "and the streaming job in its own process on the DirectRunner (which runs "
         "streaming on the BundleBasedDirectRunner: one Python process, one worker), "
         f"`--timestamp_attribute event_time --early_firing_s {args['early_firing_s']}`, "
         "DuckDB sink. After a warm-up (a message a second until the sink shows one), "
         f"events of now are published at a steady rate for {args['duration_s']:g} s, "
         f"{args['duplicate_share']:.0%} of messages resending an earlier event_id; the "
         f"DuckDB file is read (read-only) every {args['poll_s']:g} s. The graph dedups "
         "with `DeduplicateEvents`; the baseline is the same streaming job with Beam's "
         "`DeduplicatePerKey` on event_id in its place."),
        "",
        *markdown_rows(report),
        "",
        ("Columns: *freshness lag* at each sample is now minus the send time of the N-th "
         "unique event sent, N the day windows' `events` total the sink shows (0 once it "
         "shows everything sent so far); *catch-up* is from the last publish to the "
         "first sample showing every unique event; *sink events/s* is the slope of that "
         "total over the second half of publishing (what the job sustains); "
         "*events/CPU-s* are the unique events the sink gained per CPU-second (user+sys, "
         "every thread) of the job process from the first steady message to the end of "
         "measuring; *peak RSS* is the job's VmHWM; *watermark lag* is the job's own "
         "watermark lag probe (`watermark_lag_s`, transforms/freshness.py) as the job's "
         "output shows it, from the first steady message on: the gauge in its progress "
         "lines, or the probe's log line where this runner drops the gauge (it samples "
         "once per event-time minute); *sink = sent* compares every hour and day window's "
         "`events` value with the unique events sent in it, after the job stopped on "
         "SIGTERM, and checks that each window's changelog sums (sign × value) to its "
         "latest value. *load 1m* is the machine's 1-minute load average at the start "
         "and end of the run (2 cores; other work may share them)."),
        "",
        ("Streaming speed here is a property of the DirectRunner: its streaming runner is "
         "one Python process with one worker that pulls Pub/Sub 10 messages at a time, "
         "so these numbers say how lag grows once the input outruns that runner, not "
         "what a job on Dataflow (or Flink) would show: that cannot be measured on this "
         "machine."),
    ]
    return "\n".join(lines) + "\n"


def runner_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each FlinkRunner run of the graph against the DirectRunner's at the same size."""
    direct = {r["size"]: r for r in runs if "error" not in r and r["mode"] == "graph"
              and r.get("runner_option", "direct") == "direct"}
    out = []
    for r in runs:
        base = direct.get(r["size"])
        if ("error" in r or r.get("runner_option") != "flink" or base is None
                or not base["events_per_s"] or not base["events_per_cpu_s"]):
            continue
        out.append({"size": r["size"], "runner": r["runner"],
                    "events_per_s": r["events_per_s"] / base["events_per_s"],
                    "events_per_cpu_s": r["events_per_cpu_s"] / base["events_per_cpu_s"],
                    "wall_s": r["wall_s"] / base["wall_s"]})
    return out


def speedups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["size"], r["mode"]): r for r in runs if "error" not in r
              and r.get("runner_option", "direct") == "direct"}
    result = []
    for size in sorted({r["size"] for r in runs}):
        graph, baseline = by_key.get((size, "graph")), by_key.get((size, "baseline"))
        if not graph or not baseline or not baseline["events_per_s"]:
            continue
        result.append({
            "size": size,
            "events_per_s": graph["events_per_s"] / baseline["events_per_s"],
            "events_per_cpu_s": graph["events_per_cpu_s"] / baseline["events_per_cpu_s"],
            "peak_rss": graph["peak_rss_mib"] / baseline["peak_rss_mib"],
        })
    return result


def kafka_streaming(args: argparse.Namespace, modes: Sequence[str], out_dir: Path,
                    env: dict[str, Any], argv: Sequence[str]) -> int:
    """The Kafka → Flink streaming benchmark (benchmarks/streaming_kafka.py), inside a
    private network namespace: this re-executes itself there once the broker's and the
    job server's jars are cached (the namespace has no route to the registry)."""
    from benchmarks import streaming_kafka as kafka

    if not kafka.in_private_network():
        subprocess.run([str(ROOT / "scripts" / "kafka"), "prepare"], check=True)
        subprocess.run([str(ROOT / "scripts" / "fetch_flink_jobserver")], check=True,
                       stdout=subprocess.DEVNULL)
        return subprocess.call([*netns_prefix(), sys.executable, "-m", "benchmarks.run",
                                *argv], cwd=ROOT)
    started_at = _utc_now()
    settings = kafka.KafkaStreamSettings(
        duration_s=args.duration_s, early_firing_s=args.early_firing_s,
        catch_up_cap_s=args.catch_up_s, poll_s=args.poll_s,
        duplicate_share=args.duplicate_share, burst_s=args.burst_s,
        pipeline_args=args.pipeline_arg, sdk_workers=args.sdk_workers)
    say(f"Kafka → Flink streaming benchmark: rates {', '.join(f'{r:g}' for r in args.rates)}"
        f" events/s, parallelism {args.flink_parallelism}, runs {', '.join(modes)}; "
        f"{env['cpus']} CPUs, load {os.getloadavg()[0]:.1f}; results → {out_dir}")
    runs = kafka.run_all(args.rates, args.flink_parallelism, modes, settings, out_dir)
    report = {"kind": "streaming-kafka", "started_at": started_at,
              "finished_at": _utc_now(),
              "arguments": {"command": "scripts/bench " + " ".join(argv),
                            "rates": args.rates, "parallelism": args.flink_parallelism,
                            "duration_s": args.duration_s, "burst_s": args.burst_s,
                            "early_firing_s": args.early_firing_s,
                            "duplicate_share": args.duplicate_share, "poll_s": args.poll_s,
                            "pipeline_args": args.pipeline_arg, "modes": list(modes),
                            "sdk_workers": args.sdk_workers},
              "environment": env, "runs": runs}
    text = kafka.render_markdown(report)
    for name, body in (("results-streaming-kafka.json", json.dumps(report, indent=1)),
                       ("results-streaming-kafka.md", text)):
        with open(out_dir / name, "w") as f:
            f.write(body)
    say(text)
    say(f"wrote {out_dir / 'results-streaming-kafka.md'} and .json")
    return 0 if all("error" not in r for r in runs) else 1


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
        commit += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "apache_beam": metadata.version("apache-beam"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "commit": commit,
    }


# --- main -----------------------------------------------------------------------------

def bounded(args: argparse.Namespace, modes: Sequence[str], out_dir: Path,
            env: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The bounded benchmark: (report, whether every run was exact)."""
    started_at = _utc_now()
    started = time.monotonic()
    say(f"benchmark: sizes {', '.join(f'{s:,}' for s in args.sizes)}; runs "
        f"{', '.join(modes)}; Beam {env['apache_beam']}, Python {env['python']}, "
        f"{env['cpus']} CPUs; results → {out_dir}")

    datasets = {size: dataset(Path(args.data_dir), size, args.seed) for size in args.sizes}
    load_at_start = list(os.getloadavg())
    runs: list[dict[str, Any]] = []
    plan: list[tuple[str, str, int]] = []
    for runner in args.runner:
        if runner == "flink":  # the graph only: the baseline is a DirectRunner comparison
            plan += [("graph", "flink", n) for n in args.flink_parallelism]
        else:
            plan += [(mode, "direct", 1) for mode in modes]
    total = len(args.sizes) * len(plan)
    for size in args.sizes:
        for mode, runner, parallelism in plan:
            say(f"--- run {len(runs) + 1}/{total}: {mode} on {runner}"
                f"{f' p={parallelism}' if runner == 'flink' else ''} @ {size:,} events "
                f"(total elapsed {_clock(time.monotonic() - started)}, load "
                f"{os.getloadavg()[0]:.1f})")
            runs.append(run_child(mode, size, datasets[size], out_dir, args.heartbeat,
                                  runner=runner, parallelism=parallelism,
                                  extra=args.pipeline_arg))

    profile_file = None
    if args.profile:
        size = args.sizes[0]
        profile_path = out_dir / f"profile-graph-{size}.txt"
        say(f"--- profile: graph @ {size:,} events under cProfile")
        profiled = run_child("graph", size, datasets[size], out_dir, args.heartbeat,
                             profile_path)
        if "error" not in profiled:
            profile_file = str(profile_path)
            say(f"profile: {profile_path} (raw: {profile_path}.prof)")

    report = {
        "started_at": started_at,
        "finished_at": _utc_now(),
        "arguments": {"sizes": args.sizes, "seed": args.seed, "modes": list(modes),
                      "runners": list(args.runner),
                      "flink_parallelism": list(args.flink_parallelism),
                      "extra_pipeline_args": list(args.pipeline_arg),
                      "pipeline_args": ["--direct_num_workers=1",
                                        "--direct_running_mode=in_memory"]},
        "environment": env,
        "load_avg_start": load_at_start,
        "load_avg_end": list(os.getloadavg()),
        "datasets": {str(size): str(path) for size, path in datasets.items()},
        "runs": runs,
        "speedups": speedups(runs),
        "runner_ratios": runner_ratios(runs),
        "profile": profile_file,
    }
    return report, all(run_ok(r) for r in runs)


def streaming(args: argparse.Namespace, modes: Sequence[str], out_dir: Path,
              env: dict[str, Any], argv: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """The streaming lag benchmark (benchmarks/streaming.py): (report, whether every
    run's sink equalled what was sent)."""
    from benchmarks.streaming import StreamSettings, run_all, stream_verdict

    started_at = _utc_now()
    say(f"streaming benchmark: rates {', '.join(f'{r:g}' for r in args.rates)} "
        f"messages/s for {args.duration_s:g} s each; runs {', '.join(modes)}; Beam "
        f"{env['apache_beam']}, Python {env['python']}, {env['cpus']} CPUs; results → "
        f"{out_dir}")
    settings = StreamSettings(duration_s=args.duration_s,
                              early_firing_s=args.early_firing_s,
                              catch_up_cap_s=args.catch_up_s, poll_s=args.poll_s,
                              duplicate_share=args.duplicate_share)
    runs = run_all(args.rates, modes, settings, out_dir)
    report = {
        "kind": "streaming",
        "started_at": started_at,
        "finished_at": _utc_now(),
        "arguments": {"command": "scripts/bench " + " ".join(argv),
                      "rates": args.rates, "duration_s": args.duration_s,
                      "early_firing_s": args.early_firing_s,
                      "catch_up_cap_s": args.catch_up_s, "poll_s": args.poll_s,
                      "duplicate_share": args.duplicate_share, "modes": list(modes)},
        "environment": env,
        "runs": runs,
    }
    return report, all(stream_verdict(r) == "exact" for r in runs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[100_000, 1_000_000],
                        help="Dataset sizes in generated lines (e.g. 100000 1M).")
    parser.add_argument("--out", default="bench-results",
                        help="Directory for results.json, results.md (streaming: "
                             "results-streaming.*), logs, profile.")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="Only run the graph (the baseline takes ~4 min per 1M events).")
    parser.add_argument("--profile", action="store_true",
                        help="Also run the graph at the first size under cProfile and "
                             "write the top 30 functions by tottime.")
    parser.add_argument("--seed", type=int, default=1, help="Generator seed.")
    parser.add_argument("--runner", nargs="+", choices=("direct", "flink"),
                        default=["direct"],
                        help="Runners of the bounded benchmark, in this order: direct "
                             "(graph and baseline), flink (the graph on FlinkRunner "
                             "[local], one run per --flink-parallelism).")
    parser.add_argument("--flink-parallelism", nargs="+", type=int, default=[1, 2],
                        help="FlinkRunner parallelism of each Flink run.")
    parser.add_argument("--pipeline-arg", action="append", default=[],
                        help="Extra pipeline option for every run, e.g. "
                             "--pipeline-arg=--max_bundle_size=5000 (repeatable).")
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "bench-data"),
                        help="Cache of generated datasets.")
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="Seconds between 'running' lines.")
    stream = parser.add_argument_group(
        "streaming", "Lag of the streaming job reading Pub/Sub (the emulator), per "
        "publish rate (benchmarks/streaming.py); --sizes and --profile do not apply.")
    stream.add_argument("--streaming", action="store_true",
                        help="Run the streaming lag benchmark instead of the bounded one.")
    stream.add_argument("--rates", nargs="+", type=float, default=[20.0, 100.0, 300.0],
                        help="Publish rates, messages/s (duplicates included).")
    stream.add_argument("--source", choices=("pubsub", "kafka"), default="pubsub",
                        help="pubsub: the emulator, DirectRunner; kafka: a local broker "
                             "and FlinkRunner (benchmarks/streaming_kafka.py; with "
                             "--runner flink and --flink-parallelism).")
    stream.add_argument("--burst-s", type=float, default=120.0,
                        help="Kafka: length of the 5x burst on the highest sustained "
                             "rate (0: no burst run).")
    for flag, kind, default, text in (
            ("--duration-s", float, 60.0, "Seconds of steady publishing per run."),
            ("--early-firing-s", int, 5, "The job's --early_firing_s (early panes)."),
            ("--catch-up-s", float, 60.0, "How long to wait after the last publish for "
                                          "the sink to show every event."),
            ("--poll-s", float, 1.0, "Seconds between reads of the DuckDB file."),
            ("--duplicate-share", float, 0.05, "Share of messages that resend an "
                                               "earlier event_id."),
            ("--sdk-workers", int, 1, "Kafka: Python SDK harness processes: 1 runs them "
                                      "in the job's process (LOOPBACK), N a worker pool "
                                      "of N processes (EXTERNAL).")):
        stream.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args(argv)

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = ("graph",) if args.skip_baseline else MODES
    started = time.monotonic()
    env = environment()
    if args.streaming and args.source == "kafka":
        return kafka_streaming(args, modes, out_dir, env, argv)
    if args.streaming:
        report, ok = streaming(args, modes, out_dir, env, argv)
        stem = "results-streaming"
    else:
        report, ok = bounded(args, modes, out_dir, env)
        stem = "results"
    text = markdown(report)
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(report, f, indent=1)
    with open(out_dir / f"{stem}.md", "w") as f:
        f.write(text)
    say("")
    say(text)
    say(f"wrote {out_dir / f'{stem}.json'} and {out_dir / f'{stem}.md'} "
        f"(total {_clock(time.monotonic() - started)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
