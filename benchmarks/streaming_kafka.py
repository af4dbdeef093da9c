"""Kafka → Flink streaming benchmark: `scripts/bench --streaming --source kafka --runner
flink --rates 500 1000 2000 [--flink-parallelism 1 2] [--duration-s 60]`.

Everything runs in one private network namespace with only loopback up (benchmarks/run.py
re-executes itself there: Beam's LOOPBACK worker and the Java expansion service listen
on every interface, and the broker must be reachable from the job): one Kafka broker
(scripts/kafka), then for each parallelism, each graph (the job; the baseline with Beam's
DeduplicatePerKey) and each rate in increasing order: a fresh topic (4 partitions), the
streaming job as its own process on FlinkRunner [local] (`clickstream run
--kafka_bootstrap ... --kafka_topic ...`, or `python -m benchmarks.baseline` with the
same flags), a warm-up until the sink shows an event, then `clickstream load`'s
generator (pipeline/load.py) at a constant rate for the duration, while this process
samples every second:

- the sink: the day windows' `events` total in the DuckDB file (read-only): sustained
  sink events/s (slope over the second half) and freshness lag (now minus the send time
  of the N-th unique event, N what the sink shows) p50/p95/max;
- Kafka consumer lag per partition (end offset minus the group's committed offset: the
  job commits as checkpoints complete, so this trails by up to a checkpoint interval);
- CPU and RSS of the Python job process (driver + LOOPBACK SDK harness) and of its Java
  children (Flink job server with the embedded TaskManager, the expansion service);
- the job's watermark lag gauge (transforms/freshness.py) from its log lines.

A rate is sustained when the sink keeps up (slope >= 90% of the rate of unique events
sent) with p95 freshness under 60 s; escalation stops at the first rate that is not.
Then, for the graph at the highest parallelism, a burst (5x for --burst-s) on top of
the highest sustained rate: peak freshness and consumer lag, and the time from the
burst's end until freshness is back under 10 s. Results:
results-streaming-kafka.{json,md}, with load averages.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import cpu_s, descendants, status_mib
from benchmarks.run import ROOT, _forward, say
from benchmarks.streaming import (
    WATERMARK_LAG,
    Poller,
    _num,
    percentile,
    sink_events,
    sink_rate,
)
from pipeline.kafka import consumer_lag, ensure_topic
from pipeline.load import Burst, LoadConfig, run_load

READY = "streaming from "
FRESH_S = 60.0  # p95 freshness a sustained rate must stay under
CAUGHT_UP_S = 10.0  # freshness under which a burst counts as absorbed
GROUP = "clickstream-bench"


@dataclass
class KafkaStreamSettings:
    duration_s: float
    early_firing_s: int
    catch_up_cap_s: float
    poll_s: float
    duplicate_share: float
    burst_s: float
    pipeline_args: Sequence[str] = ()
    # 1: LOOPBACK, every Python stage in the job's own process (one GIL); N > 1: a worker
    # pool (runners/flink_worker_pool.py) starting N SDK harness processes.
    sdk_workers: int = 1
    warm_up_cap_s: float = 180.0
    startup_cap_s: float = 240.0


# --- pure functions (tests/test_kafka.py) ----------------------------------------------

def freshness_from_progress(progress: Sequence[tuple[float, int]],
                            samples: Sequence[tuple[float, int]]
                            ) -> list[tuple[float, float]]:
    """The sink's staleness at each sample (t, unique events shown), given the
    generator's progress ((t, unique events sent by t), ascending): t minus the time the
    shown-th event had been sent (0 once it shows all sent by t). Samples before the
    first send are skipped. Returns (t, lag) pairs."""
    times = [t for t, _ in progress]
    counts = [n for _, n in progress]
    lags = []
    for t, shown in samples:
        i = bisect.bisect_right(times, t)
        if i == 0 or counts[i - 1] == 0:
            continue
        if shown >= counts[i - 1]:
            lags.append((t, 0.0))
            continue
        sent_at = times[bisect.bisect_left(counts, max(shown, 1))]
        lags.append((t, max(0.0, t - sent_at)))
    return lags


def events_per_cpu_s(run: dict[str, Any]) -> float | None:
    """Sink events/s per core the job's processes (Python and Java) used: what the graph
    costs, whatever share of the machine it got."""
    rate, cores = run.get("sink_events_per_s"), [
        run.get("python_cpu_per_wall"), run.get("java_cpu_per_wall")]
    if rate is None or None in cores or not sum(cores):  # type: ignore[arg-type]
        return None
    return rate / sum(cores)  # type: ignore[arg-type]


def sustained(run: dict[str, Any]) -> bool:
    """The sink kept up with the unique events sent (it counts each event once, so the
    resent share of the rate never reaches it) and p95 freshness stayed under FRESH_S."""
    rate, p95 = run.get("sink_events_per_s"), run.get("lag_p95_s")
    sent, unique = run.get("sent"), run.get("unique")
    unique_rate = run["rate"] * unique / sent if sent and unique else run["rate"]
    return (rate is not None and p95 is not None and p95 < FRESH_S
            and rate >= 0.9 * unique_rate)


# --- processes -------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Every `every_s`: consumer lag per partition, CPU seconds and RSS of the job's
    Python processes (its own, and a worker pool's harnesses) and of its Java children."""

    def __init__(self, bootstrap: str, topic: str, job_pid: int, every_s: float,
                 pool_pid: int | None = None) -> None:
        super().__init__(daemon=True)
        # Not _bootstrap: that name is Thread's own method.
        self.kafka_bootstrap, self.topic, self.job_pid = bootstrap, topic, job_pid
        self.pool_pid = pool_pid
        self.every_s = every_s
        self.stop = threading.Event()
        self.samples: list[dict[str, Any]] = []
        # The newest CPU seconds read per process: a worker pool's harnesses come and
        # go, and a process that exited keeps the CPU it had used (less its last
        # interval), so the totals never go backwards.
        self._cpu_by_pid: dict[str, dict[int, float]] = {"python": {}, "java": {}}

    def _cpu_total(self, kind: str, pids: list[int]) -> float:
        seen = self._cpu_by_pid[kind]
        for pid in pids:
            used = cpu_s(pid)
            if used is not None:
                seen[pid] = max(used, seen.get(pid, 0.0))
        return sum(seen.values())

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            sample: dict[str, Any] = {"t": time.time()}
            with contextlib.suppress(Exception):
                sample["lag"] = {p.partition: p.lag for p in consumer_lag(
                    self.kafka_bootstrap, self.topic, GROUP, timeout_s=5)}
            java = descendants(self.job_pid)
            python = [self.job_pid]
            if self.pool_pid is not None:
                python += [self.pool_pid, *descendants(self.pool_pid, "python")]
            sample["python_cpu_s"] = self._cpu_total("python", python)
            sample["python_rss_mib"] = sum(status_mib(p) or 0.0 for p in python)
            sample["java_cpu_s"] = self._cpu_total("java", java)
            sample["java_rss_mib"] = sum(status_mib(p) or 0.0 for p in java)
            self.samples.append(sample)


def job_command(mode: str, bootstrap: str, topic: str, db: str, parallelism: int,
                settings: KafkaStreamSettings, max_run_s: int,
                pool_address: str | None = None) -> list[str]:
    from runners.flink import resolve_job_server_jar

    environment = (["--environment_type=LOOPBACK"] if pool_address is None else
                   ["--environment_type=EXTERNAL", f"--environment_config={pool_address}",
                    f"--sdk_worker_parallelism={settings.sdk_workers}"])
    entry = (["-m", "pipeline.cli", "run"] if mode == "graph"
             else ["-m", "benchmarks.baseline"])
    return [sys.executable, *entry, *resolve_job_server_jar([
        "--kafka_bootstrap", bootstrap, "--kafka_topic", topic, "--kafka_group", GROUP,
        "--duckdb_path", db, "--early_firing_s", str(settings.early_firing_s),
        "--max_run_s", str(max_run_s), "--runner=FlinkRunner", "--flink_version=1.19",
        "--flink_master=[local]", *environment,
        f"--parallelism={parallelism}", "--checkpointing_interval=10000",
        *settings.pipeline_args])]


@contextlib.contextmanager
def worker_pool(workers: int, env: dict[str, str], log: Any
                ) -> Iterator[tuple[str, int] | None]:
    """With more than one SDK worker: a worker pool on 127.0.0.1 for the job's EXTERNAL
    environment, yielding (address, pid), stopped after; with one: None (LOOPBACK)."""
    if workers <= 1:
        yield None
        return
    from runners.flink_session import free_port, wait_for_port
    from tests.servers import stop_process

    port = free_port()
    pool = subprocess.Popen([sys.executable, "-m", "runners.flink_worker_pool", "--host",
                             "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 30, lambda: pool.poll() is None)
        yield f"127.0.0.1:{port}", pool.pid
    finally:
        stop_process(pool, timeout=30)


def run_one(bootstrap: str, mode: str, parallelism: int, rate: float,
            settings: KafkaStreamSettings, out_dir: Path, burst: Burst | None = None
            ) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="clickstream-bench-kafka-"))
    try:
        return _run_one(bootstrap, mode, parallelism, rate, settings, out_dir,
                        str(work / "stream.duckdb"), burst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_one(bootstrap: str, mode: str, parallelism: int, rate: float,
             settings: KafkaStreamSettings, out_dir: Path, db: str,
             burst: Burst | None) -> dict[str, Any]:
    from pipeline.compare import changelog_mismatches
    from tests.servers import stop_process

    label = f"{mode} p{parallelism} @ {rate:g}/s{' + burst' if burst else ''}"
    prefix = f"[{label}]"
    topic = f"bench-{mode}-p{parallelism}-{int(rate)}{'-burst' if burst else ''}"
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"kafka-{topic}.log"
    duration = settings.duration_s + (burst.length_s + 60 if burst else 0)
    result: dict[str, Any] = {"mode": mode, "parallelism": parallelism, "rate": rate,
                              "burst": burst.__dict__ if burst else None,
                              "duration_s": duration, "log": str(log_path),
                              "load_1m_start": os.getloadavg()[0]}
    ensure_topic(bootstrap, topic)
    max_run_s = int(settings.startup_cap_s + settings.warm_up_cap_s + duration
                    + settings.catch_up_cap_s + 120)
    watermark: list[tuple[float, float]] = []
    ready = threading.Event()

    def watch(line: str) -> None:
        if READY in line:
            ready.set()
        match = WATERMARK_LAG.search(line)
        if match:
            watermark.append((time.time(), float(match.group(1).replace(",", ""))))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    tail: list[str] = []
    started = time.monotonic()
    with open(log_path, "w") as log, worker_pool(settings.sdk_workers, env, log) as pool:
        command = job_command(mode, bootstrap, topic, db, parallelism, settings, max_run_s,
                              pool and pool[0])
        say(f"{prefix} starting the job (log: {log_path})")
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
        assert job.stdout is not None
        reader = threading.Thread(target=_forward, args=(job.stdout, prefix, log, tail,
                                                         watch), daemon=True)
        reader.start()
        poller = Poller(db, settings.poll_s)
        sampler = Sampler(bootstrap, topic, job.pid, 2.0, pool and pool[1])
        try:
            deadline = time.monotonic() + settings.startup_cap_s
            while not ready.is_set():
                if job.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the job did not start: " + "".join(tail[-5:]))
                time.sleep(0.5)
            result["startup_s"] = time.monotonic() - started
            warm0, warm = time.monotonic(), 0
            while sink_events(db) in (None, 0):
                if time.monotonic() - warm0 > settings.warm_up_cap_s or job.poll() is not None:
                    raise RuntimeError("the sink showed nothing during the warm-up")
                warm += run_load(LoadConfig(bootstrap, topic, 20, 1.0,
                                            id_prefix=f"warm{warm}")).unique
            while (sink_events(db) or 0) < warm and time.monotonic() - warm0 < 60:
                time.sleep(0.5)
            result["warm_up_s"] = time.monotonic() - warm0
            shown_warm = sink_events(db) or 0
            say(f"{prefix} warm ({result['warm_up_s']:.0f} s); loading {rate:g} events/s "
                f"for {duration:g} s")
            poller.start()
            sampler.start()
            load = run_load(LoadConfig(bootstrap, topic, rate, duration, burst=burst,
                                       duplicate_share=settings.duplicate_share,
                                       id_prefix=f"{mode}{parallelism}r{int(rate)}"))
            total = shown_warm + load.unique
            say(f"{prefix} {load.render()}; sink shows {poller.latest():,} of {total:,}")
            catch0 = time.monotonic()
            while poller.latest() < total and time.monotonic() - catch0 < \
                    settings.catch_up_cap_s and job.poll() is None:
                time.sleep(settings.poll_s / 2)
            time.sleep(settings.poll_s * 1.5)
            result["peak_rss_python_mib"] = status_mib(job.pid, "VmHWM")
            result["peak_rss_java_mib"] = sum(status_mib(p, "VmHWM") or 0.0
                                              for p in descendants(job.pid))
        finally:
            poller.stop.set()
            sampler.stop.set()
            for thread in (poller, sampler):
                if thread.is_alive():
                    thread.join(timeout=30)
            stop_process(job, timeout=120)
            reader.join(timeout=10)
        result["exit_code"] = job.returncode
    first_s = load.progress[0][0]
    samples = [(t, n - shown_warm) for t, n in poller.samples if t >= first_s]
    timed_lags = freshness_from_progress(load.progress, samples)
    lags = [lag for _, lag in timed_lags]
    usage = sampler.samples
    measured = [s for s in usage if s.get("python_cpu_s") is not None]
    wall = (measured[-1]["t"] - measured[0]["t"]) if len(measured) > 1 else None

    def cpu_share(key: str) -> float | None:
        if not wall:
            return None
        return (measured[-1][key] - measured[0][key]) / wall

    lag_by_partition: dict[int, int] = {}
    for s in usage:
        for partition, lag in s.get("lag", {}).items():
            lag_by_partition[partition] = max(lag_by_partition.get(partition, 0), lag)
    result.update({
        "sent": load.sent, "unique": load.unique, "duplicates": load.duplicates,
        "generator_rate": load.rate, "generator_max_behind_s": load.max_behind_s,
        "lag_p50_s": percentile(lags, 50), "lag_p95_s": percentile(lags, 95),
        "lag_max_s": max(lags) if lags else None,
        "sink_events_per_s": sink_rate(samples, first_s + settings.duration_s / 2,
                                       first_s + settings.duration_s),
        "shown_at_end": samples[-1][1] if samples else 0,
        "caught_up": bool(samples) and samples[-1][1] >= load.unique,
        "consumer_lag_max_by_partition": lag_by_partition,
        "python_cpu_per_wall": cpu_share("python_cpu_s"),
        "java_cpu_per_wall": cpu_share("java_cpu_s"),
        "python_rss_max_mib": max((s["python_rss_mib"] or 0 for s in usage), default=None),
        "java_rss_max_mib": max((s["java_rss_mib"] for s in usage), default=None),
        "watermark_lag_max_s": max((v for t, v in watermark if t >= first_s),
                                   default=None),
        "changelog_sums_to_latest": not changelog_mismatches(db),
        "load_1m_end": os.getloadavg()[0],
        "process_s": time.monotonic() - started,
    })
    if burst is not None:
        burst_start = first_s + (burst.start_s or 0)
        burst_end = burst_start + burst.length_s
        back = next((t for t, lag in timed_lags if t >= burst_end and lag <= CAUGHT_UP_S),
                    None)
        result["burst_peak_lag_s"] = max((lag for t, lag in timed_lags if t >= burst_start),
                                         default=None)
        result["burst_catch_up_s"] = None if back is None else back - burst_end
        result["burst_peak_consumer_lag"] = max(
            (sum(s.get("lag", {}).values()) for s in usage if s["t"] >= burst_start),
            default=None)
    result["sustained"] = sustained(result)
    say(f"{prefix} done: sink {_num(result['sink_events_per_s'], 0)} events/s, freshness "
        f"p50 {_num(result['lag_p50_s'])} / p95 {_num(result['lag_p95_s'])} / max "
        f"{_num(result['lag_max_s'])} s; "
        f"{'SUSTAINED' if result['sustained'] else 'not sustained'}; python CPU "
        f"{_num(result['python_cpu_per_wall'], 2)}, java CPU "
        f"{_num(result['java_cpu_per_wall'], 2)}; load {result['load_1m_end']:.1f}")
    return result


def run_all(rates: Sequence[float], parallelisms: Sequence[int], modes: Sequence[str],
            settings: KafkaStreamSettings, out_dir: Path) -> list[dict[str, Any]]:
    from tests.servers import kafka_broker

    runs: list[dict[str, Any]] = []
    with kafka_broker() as bootstrap:
        say(f"Kafka broker on {bootstrap}")
        for parallelism in parallelisms:
            for mode in modes:
                for rate in sorted(rates):
                    try:
                        result = run_one(bootstrap, mode, parallelism, rate, settings,
                                         out_dir)
                    except Exception as exc:  # one failed run must not lose the others
                        say(f"[{mode} p{parallelism} @ {rate:g}/s] FAILED: {exc}")
                        result = {"mode": mode, "parallelism": parallelism, "rate": rate,
                                  "error": str(exc), "sustained": False}
                    runs.append(result)
                    if not result["sustained"]:
                        break  # higher rates will not be sustained either
        graph = [r for r in runs if r["mode"] == "graph"
                 and r["parallelism"] == max(parallelisms) and r["sustained"]]
        if graph and settings.burst_s > 0:
            base = max(r["rate"] for r in graph)
            burst = Burst(5, settings.burst_s, settings.duration_s / 2)
            try:
                result = run_one(bootstrap, "graph", max(parallelisms), base, settings,
                                 out_dir, burst)
            except Exception as exc:
                say(f"[burst] FAILED: {exc}")
                result = {"mode": "graph", "rate": base, "burst": burst.__dict__,
                          "error": str(exc), "sustained": False}
            runs.append(result)
    return runs


def markdown_rows(runs: Sequence[dict[str, Any]]) -> list[str]:
    head = ("| graph | parallelism | rate events/s | sink events/s (2nd half) | freshness "
            "p50 / p95 / max s | sustained | consumer lag max per partition | watermark "
            "lag max s | CPU python / java (cores) | events per job CPU-s | RSS max python / "
            "java MiB | load 1m start → end |")
    rows = [head, "|" + "---|" * 12]
    for r in runs:
        if "error" in r:
            rows.append(f"| {r['mode']} | {r.get('parallelism', '')} | {r['rate']:g} | "
                        f"failed: {r['error'][:80]} |" + " |" * 8)
            continue
        lags = ", ".join(f"{p}: {n:,}" for p, n in sorted(
            r["consumer_lag_max_by_partition"].items()))
        rate = f"{r['rate']:g}" + (f" + burst {r['burst']['factor']:g}x for "
                                   f"{r['burst']['length_s']:g} s" if r["burst"] else "")
        rows.append(
            f"| {r['mode']} | {r['parallelism']} | {rate} | "
            f"{_num(r['sink_events_per_s'], 0)} | {_num(r['lag_p50_s'])} / "
            f"{_num(r['lag_p95_s'])} / {_num(r['lag_max_s'])} | "
            f"{'yes' if r['sustained'] else 'no'} | {lags} | "
            f"{_num(r['watermark_lag_max_s'])} | {_num(r['python_cpu_per_wall'], 2)} / "
            f"{_num(r['java_cpu_per_wall'], 2)} | {_num(events_per_cpu_s(r), 0)} | "
            f"{_num(r['python_rss_max_mib'], 0)} / "
            f"{_num(r['java_rss_max_mib'], 0)} | {r['load_1m_start']:.1f} → "
            f"{r['load_1m_end']:.1f} |")
    return rows


def summary_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for mode in sorted({r["mode"] for r in runs}):
        for parallelism in sorted({r.get("parallelism", 0) for r in runs}):
            ok = [r["rate"] for r in runs if r["mode"] == mode and not r.get("burst")
                  and r.get("parallelism") == parallelism and r["sustained"]]
            if any(r["mode"] == mode and r.get("parallelism") == parallelism for r in runs):
                lines.append(f"- {mode}, parallelism {parallelism}: highest rate sustained "
                             f"with p95 freshness < {FRESH_S:g} s: "
                             f"{f'{max(ok):g} events/s' if ok else 'none of those tried'}")
    for r in runs:
        if r.get("burst") and "error" not in r:
            lines.append(f"- burst {r['burst']['factor']:g}x for {r['burst']['length_s']:g} "
                         f"s on {r['rate']:g} events/s: peak freshness lag "
                         f"{_num(r['burst_peak_lag_s'])} s, peak consumer lag "
                         f"{r['burst_peak_consumer_lag'] or 0:,} records, back under "
                         f"{CAUGHT_UP_S:g} s freshness "
                         f"{_num(r['burst_catch_up_s'])} s after the burst ended"
                         + ("" if r["burst_catch_up_s"] is not None else " (never)"))
    return lines


def in_private_network() -> bool:
    """Whether this process sees only the loopback interface."""
    import socket

    return {name for _, name in socket.if_nameindex()} <= {"lo"}


def render_markdown(report: dict[str, Any]) -> str:
    """results-streaming-kafka.md from the report (also: `python -m
    benchmarks.streaming_kafka results-streaming-kafka.json` rewrites the .md)."""
    from benchmarks.run import _title

    args = report["arguments"]
    workers = args.get("sdk_workers", 1)
    harness = ("LOOPBACK: the Python SDK harness in the job's process" if workers <= 1 else
               f"a worker pool of {workers} Python SDK harness processes, EXTERNAL")
    extra = " ".join(args.get("pipeline_args") or [])
    return "\n".join([
        *_title(report, "clickstream-beam streaming benchmark: Kafka → FlinkRunner"),
        f"`{report['arguments']['command']}`", "",
        "One Kafka broker (scripts/kafka), the job on FlinkRunner `[local]` "
        f"({harness}; checkpoints every 10 s, offsets committed on completion"
        f"{'; ' + extra if extra else ''}) and the load generator "
        "(`clickstream load`, constant rate, "
        f"{args['duplicate_share']:g} resent) all on this machine, in one network namespace; "
        f"{args['duration_s']:g} s of load per rate, the DuckDB sink read every "
        f"{args.get('poll_s', 1.0):g} s. Rates rise until one is not sustained (sink "
        "slope < 90% of the unique events' rate, or p95 freshness ≥ 60 s). The baseline "
        "is the same job with Beam's DeduplicatePerKey.", "",
        *markdown_rows(report['runs']), "", *summary_lines(report['runs']), "",
        "Columns: *freshness* is now minus the send time of the N-th unique event, N the "
        "day windows' `events` total in the sink; *consumer lag* is end offset minus the "
        "group's committed offset per partition (committed at checkpoints, so it trails "
        "by up to 10 s of input); *watermark lag* is the job's `watermark_lag_s` probe "
        "from its log; *CPU* is cores used (CPU-seconds per second) by the job's Python "
        "processes (driver, SDK harnesses) and its Java children (job server with "
        "the embedded Flink, expansion service), and *events per job CPU-s* the sink rate "
        "per core those used together; *load 1m* is the machine's load average "
        "(others share it).", ""])


if __name__ == "__main__":
    import json

    path = Path(sys.argv[1])
    with open(path) as f:
        loaded = json.load(f)
    path.with_suffix(".md").write_text(render_markdown(loaded))
