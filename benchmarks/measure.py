"""One measured run in its own process (started by benchmarks.run, one per size × graph).

    python -m benchmarks.measure --mode graph|baseline --data DIR --duckdb FILE
                                 --result FILE [--profile FILE]
                                 [--runner direct|flink] [--parallelism N] [ARG ...]

Wall and CPU time cover building and running the pipeline only (imports come first);
peak RSS is this process's high-water mark, read right after the run, before the
oracle is loaded. The result is written as JSON to --result.

``--runner flink`` runs the graph on FlinkRunner ``[local]`` (runners/flink.py's preset,
no checkpoints: a bounded job), LOOPBACK, at ``--parallelism``; the caller runs this
process in a private network namespace (the LOOPBACK worker binds every interface).
The job server is a Java child of this process: its CPU time and peak RSS are read from
/proc right after the run (it is still up then; Beam stops it at exit), and reported
beside this Python process's own. Extra ARGs go to the pipeline (e.g.
``--max_bundle_size=5000``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner
from apache_beam.runners.portability.prism_runner import PrismRunner

from benchmarks.baseline import DEDUP_INPUT_COUNTER, build_baseline
from benchmarks.procs import cpu_s, descendants, status_mib
from pipeline import compare, job, oracle
from pipeline.compare import differences, latest_from_duckdb
from pipeline.options import ClickstreamOptions
from runners.flink import use_job_server_tmpdir
from transforms.sink_duckdb import read_rows

log = logging.getLogger("clickstream.bench")

COUNT_KEYS = ("read", "unique", "duplicates", "dead_letter")

# Rows in the sink, read from DuckDB itself: on the BundleBasedDirectRunner the counters
# of timer-fired bundles (final revisions, their writes) go missing from the run's metrics.
SINK_ROWS_SQL = """
    SELECT (SELECT count(*) FROM metric_changelog), (SELECT count(*) FROM metric_latest),
           (SELECT count(*) FROM metric_latest WHERE is_final),
           (SELECT count(*) FROM dead_letter)"""


# A bounded job needs no checkpoints, RocksDB or checkpoint storage.
FLINK_BOUNDED: dict[str, object] = {
    "checkpointing_interval": None, "min_pause_between_checkpoints": None,
    "state_backend": None, "state_backend_storage_path": None,
    "externalized_checkpoints_enabled": None,
    "retain_externalized_checkpoints_on_cancellation": None,
}


def runner_args(runner: str, parallelism: int) -> list[str]:
    if runner == "flink":
        from runners import preset_args

        return preset_args("flink", **FLINK_BOUNDED, parallelism=parallelism)
    return ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def pipeline_args(data_dir: str, duckdb_path: str, runner: str = "direct",
                  parallelism: int = 1, extra: Sequence[str] = ()) -> list[str]:
    return ["--input_files", os.path.join(data_dir, "events-*.jsonl"),
            "--duckdb_path", duckdb_path, *runner_args(runner, parallelism), *extra]


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds user+sys, peak RSS MiB) of a live process."""
    return cpu_s(pid) or 0.0, status_mib(pid, "VmHWM") or 0.0


_runners_used: list[str] = []


def _record_runner_choice() -> None:
    """DirectRunner picks Prism, the FnApiRunner or the BundleBasedDirectRunner by what
    the graph uses: note each one that is asked to run, the last is the one that ran."""
    for cls in (PrismRunner, FnApiRunner, BundleBasedDirectRunner):
        original = cls.run_pipeline

        def run_pipeline(self, *args: Any, _original: Callable = original,
                         **kwargs: Any) -> Any:
            _runners_used.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        cls.run_pipeline = run_pipeline  # type: ignore[method-assign]


def _report_progress(result: Any, started: float, stop: threading.Event,
                     every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            read = job.counters_of(result).get("read", 0)
        except Exception:  # progress is best effort
            log.debug("progress: counters not readable yet", exc_info=True)
            continue
        elapsed = time.monotonic() - started
        log.info("progress: %.0f s, %s events read (%s/s)", elapsed, f"{read:,}",
                 f"{read / elapsed:,.0f}")


def run_baseline(argv: Sequence[str], progress_every_s: float) -> job.RunSummary:
    """pipeline.job.run, with the baseline graph."""
    options = PipelineOptions(list(argv))
    options.view_as(StandardOptions).streaming = False
    use_job_server_tmpdir(options)
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build_baseline(p, options.view_as(ClickstreamOptions))
    result = p.run()
    stop = threading.Event()
    threading.Thread(target=_report_progress, args=(result, started, stop, progress_every_s),
                     daemon=True).start()
    try:
        state = result.wait_until_finish()
    finally:
        stop.set()
    counters = job.counters_of(result)
    if "duplicates" not in counters and DEDUP_INPUT_COUNTER in counters:
        counters["duplicates"] = counters[DEDUP_INPUT_COUNTER] - counters.get("unique", 0)
    return job.RunSummary(counters, time.monotonic() - started, str(state))


def _write_profile(profiler: cProfile.Profile, path: str, top: int = 30) -> None:
    profiler.dump_stats(path + ".prof")
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
    with open(path, "w") as f:
        f.write(f"Top {top} functions by tottime (cProfile; main thread only).\n"
                f"Raw profile: {os.path.basename(path)}.prof "
                "(python -m pstats, snakeviz, ...)\n")
        f.write(text.getvalue())


def measure(mode: str, data_dir: str, duckdb_path: str, profile_path: str | None,
            progress_every_s: float, runner: str = "direct", parallelism: int = 1,
            extra: Sequence[str] = ()) -> dict[str, Any]:
    argv = pipeline_args(data_dir, duckdb_path, runner, parallelism, extra)
    _record_runner_choice()
    profiler = cProfile.Profile() if profile_path else None
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    if profiler:
        profiler.enable()
    try:
        if mode == "graph":
            summary = job.run(argv, progress_every_s=progress_every_s)
        else:
            summary = run_baseline(argv, progress_every_s)
    finally:
        if profiler:
            profiler.disable()
    wall_s = time.perf_counter() - wall0
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    java = [process_usage(pid) for pid in descendants(os.getpid())]
    java_cpu_s = sum(cpu for cpu, _ in java)
    java_peak_mib = max((peak for _, peak in java), default=0.0)
    if profiler and profile_path:
        _write_profile(profiler, profile_path)

    user_s = (self1.ru_utime - self0.ru_utime) + (children1.ru_utime - children0.ru_utime)
    sys_s = (self1.ru_stime - self0.ru_stime) + (children1.ru_stime - children0.ru_stime)
    counters = summary.counters
    read = counters.get("read", 0)

    with open(os.path.join(data_dir, "expected.json")) as f:
        expected = json.load(f)
    problems = differences(latest_from_duckdb(duckdb_path), oracle.from_json(expected["metrics"]))
    counts_expected = {k: expected["counts"][k] for k in COUNT_KEYS}
    counts_got = {k: counters.get(k, 0) for k in COUNT_KEYS}
    changelog_rows, latest_rows, final_rows, dead_letter_rows = read_rows(
        duckdb_path, SINK_ROWS_SQL)[0]
    changelog_mismatches = len(compare.changelog_mismatches(duckdb_path))
    python_cpu_s = user_s + sys_s
    total_cpu_s = python_cpu_s + java_cpu_s
    flink = runner == "flink"
    return {
        "mode": mode,
        "runner": (f"FlinkRunner [local] p={parallelism}" if flink else
                   _runners_used[-1] if _runners_used else "unknown"),
        "runner_option": runner,
        "parallelism": parallelism if flink else 1,
        "pipeline_args": argv,
        "runners_tried": list(_runners_used),
        "dedup": ("transforms.dedup.DeduplicateEvents" if mode == "graph" else
                  "apache_beam.transforms.deduplicate.DeduplicatePerKey"),
        "profiled": bool(profiler),
        "state": summary.state,
        "events_read": read,
        "wall_s": wall_s,
        "events_per_s": read / wall_s if wall_s else 0.0,
        "workers": 1,
        "cpu_user_s": user_s,
        "cpu_sys_s": sys_s,
        "cpu_s": total_cpu_s,
        "cpu_python_s": python_cpu_s,
        "cpu_java_s": java_cpu_s,
        "peak_rss_java_mib": java_peak_mib,
        "java_processes": len(java),
        "events_per_cpu_s": read / total_cpu_s if total_cpu_s else 0.0,
        "cpu_per_wall": total_cpu_s / wall_s if wall_s else 0.0,
        "peak_rss_mib": self1.ru_maxrss / 1024,
        "rss_before_run_mib": rss_before_kib / 1024,
        "children_peak_rss_mib": children1.ru_maxrss / 1024,
        "counters": dict(sorted(counters.items())),
        "duplicates_derived": mode == "baseline" and DEDUP_INPUT_COUNTER in counters,
        "reconciles": summary.reconciles,
        "counts": counts_got,
        "counts_expected": counts_expected,
        "counts_match": counts_got == counts_expected,
        "oracle_match": not problems,
        "oracle_differences": len(problems),
        "oracle_difference_sample": problems[:10],
        "sink_rows": {"metric_changelog": changelog_rows, "metric_latest": latest_rows,
                      "metric_latest_final": final_rows, "dead_letter": dead_letter_rows},
        "changelog_sums_to_latest": changelog_mismatches == 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure")
    parser.add_argument("--mode", choices=("graph", "baseline"), required=True)
    parser.add_argument("--data", required=True, help="A generated dataset directory.")
    parser.add_argument("--duckdb", required=True, help="DuckDB file to write (fresh).")
    parser.add_argument("--result", required=True, help="Where to write the JSON result.")
    parser.add_argument("--profile", default=None,
                        help="Run under cProfile; write the top functions here.")
    parser.add_argument("--progress-every", type=float, default=10.0)
    parser.add_argument("--runner", choices=("direct", "flink"), default="direct")
    parser.add_argument("--parallelism", type=int, default=1,
                        help="FlinkRunner parallelism (direct: always one worker).")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = measure(args.mode, args.data, args.duckdb, args.profile, args.progress_every,
                     args.runner, args.parallelism, extra)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
